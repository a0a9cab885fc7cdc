"""ComfyUI node classes — the only code in the project that imports ``comfy``.

The node pack is built in a later issue (#6); until then the extension registers no nodes, so that linking the
package into ``custom_nodes`` is harmless.
"""

from comfy_api.latest import ComfyExtension, io


class UnlearnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> UnlearnExtension:
    return UnlearnExtension()
