// ComfyUI-Unlearn front-end extension: a live chart of the training (loss, λ per constraint) drawn on the
// Unlearn Concept / Unlearn Data nodes while they run (the slack the messages carry is not drawn).
//
// The nodes send "unlearn.progress" messages over ComfyUI's websocket (PromptServer.send_sync):
//   {node, step, total, loss}                         every step
//   {node, step, total, lambda: [...], slack: [...]}  at every dual update
//   {node, reset: true, names: [...]}                 when a run starts
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const TRAIN_NODES = new Set(["Unlearn_UnlearnConcept", "Unlearn_UnlearnData"]);
const CHART_WIDGET = "unlearn_chart";
const CHART_H = 96;
const PAD = 8;
const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176"];

function emptySeries(names) {
  return { names: names || [], loss: [], lambda: [], step: 0, total: 0 };
}

function findNode(id) {
  if (id === undefined || id === null) return null;
  const graph = app.graph;
  return graph.getNodeById(Number(id)) ?? graph.getNodeById(id) ?? null;
}

function polyline(ctx, pts, x0, y0, w, h, xmax, ymin, ymax) {
  if (pts.length < 1) return;
  const span = ymax - ymin || 1;
  ctx.beginPath();
  pts.forEach(([x, y], i) => {
    const px = x0 + (xmax > 0 ? (x / xmax) * w : 0);
    const py = y0 + h - ((y - ymin) / span) * h;
    if (i === 0) ctx.moveTo(px, py);
    else ctx.lineTo(px, py);
  });
  ctx.stroke();
}

// The chart is a canvas widget below the node's other widgets: the layout gives it its own CHART_H rows, so the
// widgets that grow (the multiline text boxes, DOM elements over the canvas) cannot cover it.
function drawChart(ctx, width, top, s) {
  const w = width - 2 * PAD;
  const h = CHART_H - 2 * PAD - 12;
  const half = (w - PAD) / 2;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(PAD, top, w, CHART_H - PAD);
  ctx.font = "10px sans-serif";
  ctx.textAlign = "left";
  ctx.fillStyle = "#ccc";
  ctx.fillText(`step ${s.step}/${s.total}`, PAD + 4, top + 11);
  // left: loss
  const losses = s.loss.filter(([, y]) => Number.isFinite(y));
  if (losses.length) {
    const ys = losses.map(([, y]) => y);
    ctx.strokeStyle = "#bbb";
    ctx.lineWidth = 1;
    polyline(ctx, losses, PAD + 4, top + 14, half - 8, h, s.total, Math.min(...ys), Math.max(...ys));
    ctx.fillText(`loss ${ys[ys.length - 1].toPrecision(3)}`, PAD + 4, top + CHART_H - PAD - 2);
  }
  // right: λ per constraint (0 … max λ). The server sends null for a non-finite value: not plotted, shown as "–".
  const x1 = PAD + half + PAD;
  const lmax = Math.max(1e-6, ...s.lambda.flatMap(([, v]) => v.filter(Number.isFinite)));
  const n = s.lambda.length ? s.lambda[0][1].length : 0;
  for (let i = 0; i < n; i++) {
    ctx.strokeStyle = COLORS[i % COLORS.length];
    const pts = s.lambda.map(([x, v]) => [x, v[i]]).filter(([, y]) => Number.isFinite(y));
    polyline(ctx, pts, x1, top + 14, half - 8, h, s.total, 0, lmax);
  }
  if (n) {
    const last = s.lambda[s.lambda.length - 1][1];
    ctx.fillStyle = "#ccc";
    const label = last.map((v) => (Number.isFinite(v) ? v.toFixed(3) : "–")).join(", ");
    ctx.fillText("λ " + label, x1, top + CHART_H - PAD - 2);
  }
  ctx.restore();
}

function chartWidget(node) {
  const existing = node.widgets?.find((w) => w.name === CHART_WIDGET);
  if (existing) return existing;
  const widget = node.addCustomWidget({
    name: CHART_WIDGET,
    type: CHART_WIDGET,
    value: null,
    serialize: false, // not in the saved workflow's widgets_values
    options: { serialize: false }, // not an input of the queued prompt
    computeSize(width) {
      return [width ?? node.size[0], CHART_H];
    },
    draw(ctx, n, width, y) {
      if (n.unlearnSeries) drawChart(ctx, width, y, n.unlearnSeries);
    },
  });
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  return widget;
}

app.registerExtension({
  name: "comfyui_unlearn.core",

  async setup() {
    api.addEventListener("unlearn.progress", ({ detail }) => {
      const node = findNode(detail?.node);
      if (!node || !TRAIN_NODES.has(node.type)) return;
      if (detail.reset || !node.unlearnSeries) node.unlearnSeries = emptySeries(detail.names);
      const s = node.unlearnSeries;
      if (typeof detail.step === "number") s.step = detail.step + 1;
      if (typeof detail.total === "number") s.total = detail.total;
      if (typeof detail.loss === "number") s.loss.push([detail.step, detail.loss]);
      if (Array.isArray(detail.lambda)) s.lambda.push([detail.step, detail.lambda]);
      chartWidget(node);
      node.setDirtyCanvas(true, false);
    });
  },
});
