"""ComfyUI-Manager install hook: install the pinned runtime dependencies into ComfyUI's own Python.

torch is never installed here: ComfyUI's environment owns it.
"""

import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
subprocess.check_call([sys.executable, "-m", "pip", "install", "-r", os.path.join(here, "requirements.txt")])
