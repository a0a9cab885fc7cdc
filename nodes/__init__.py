"""ComfyUI node classes — the only code in the project that imports ``comfy``.

Registered through ComfyUI's V3 API (``ComfyExtension`` + ``comfy_entrypoint``); see ``NODES.md``.
"""

from comfy_api.latest import ComfyExtension, io

from .unlearn_nodes import NODES


class UnlearnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> UnlearnExtension:
    return UnlearnExtension()
