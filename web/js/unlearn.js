// ComfyUI-Unlearn front-end extension. The live λ / constraint chart arrives with the node pack (issue #6);
// for now the extension only registers itself so that its loading can be checked.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "comfyui_unlearn.core",
});
