"""ComfyUI-Unlearn — ComfyUI entry point (V3 node API).

Importing this package outside ComfyUI (tests, the CLI) must work: everything that touches ``comfy`` lives in
``nodes/`` and is only imported when ComfyUI asks for the extension.
"""

WEB_DIRECTORY = "./web"

try:  # ComfyUI present: expose the V3 entrypoint
    from comfy_api.latest import ComfyExtension  # noqa: F401
except ImportError:  # plain Python (tests, CLI): nothing to register
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY"]
