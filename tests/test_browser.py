"""The served ComfyUI front end (0.3.75, frontend package 1.32.x) in headless Chromium, with this package linked into
``custom_nodes``: our JS extension loads, our nodes are in the node library, an example workflow opens on the canvas
with its widget values, the live training chart draws from "unlearn.progress" events — first fake ones, then those
of a real training run the page queues — and the console stays free of errors from us. Screenshots are kept as
artifacts (``$UNLEARN_ARTIFACTS/frontend*.png``, else pytest's tmp dir).

Chromium is driven over the DevTools protocol (CDP) with aiohttp's websocket client (already in the venv: ComfyUI
needs it). One ComfyUI server (with the generated random SD1.5 checkpoint of the server tests, for the real run) and
one Chromium for the module, both killed by process group at teardown. Skipped if Chromium is not installed
(``apt-get install chromium``) or ComfyUI cannot be obtained. About 2–4 minutes on two shared CPU cores: ComfyUI's
start-up ~40 s, the page ~10 s, the real run (two training steps, two 2-step samplers) 1–2 min.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from comfy_env import ComfyUnavailable, comfyui_dir
from comfy_server import CHECKPOINT, ComfyServer, kill_group, sd15_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "example_workflows" / "01_erase_a_concept.json"
EXTENSION = "comfyui_unlearn.core"
EXTENSION_JS = "/extensions/ComfyUI-Unlearn/js/unlearn.js"
NODE_IDS = ("Unlearn_UnlearnConcept", "Unlearn_UnlearnData", "Unlearn_SaveUnlearningLora",
            "Unlearn_ApplyUnlearningLora", "Unlearn_StripUnlearningLora")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1600, 1000)

# Console errors the test tolerates, with the reason; any other error (and every exception) fails it. The start-up
# ones appear just the same when the server runs without this package (checked with frontend 1.32.9); the others
# come from loading the example (its checkpoint's download URL, the registry lookup of its node types).
TOLERATED = (
    # The test machine may have no internet: the front end's calls to api.comfy.org (release notes, the registry's
    # entries for the node types of a loaded workflow) fail, and so does the missing-models dialog's request for the
    # size of the example's checkpoint at its download URL (the server does not have it). Our code fetches nothing
    # from outside the server.
    (re.compile(r"net::ERR_[A-Z_]+ https://(api\.comfy\.org|huggingface\.co)/"), "no internet on the test machine"),
    (re.compile(r"^Error fetching file size: TypeError: Failed to fetch\s+at fetchFileSize "),
     "no internet on the test machine (missing-models dialog)"),
    # A fresh ComfyUI base directory: no user.css, no saved workflows/subgraphs/templates; no favicon at /.
    (re.compile(r"status of 404 \(Not Found\) http://127\.0\.0\.1:\d+/(user\.css|favicon\.ico|api/userdata/user\.css"
                r"|api/userdata\?dir=(workflows|subgraphs)|api/userdata/comfy\.templates\.json)"),
     "a fresh ComfyUI user directory"),
    # Frontend 1.32.9's GraphView stores its render-mode setting before the setting is defined (onChange reads
    # .id of the missing definition).
    (re.compile(r"^TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange "),
     "a front-end bug at start-up"),
)


def find_chromium() -> str | None:
    override = os.environ.get("UNLEARN_CHROMIUM")  # a Chromium/Chrome binary to use instead
    if override:
        return shutil.which(override)
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


# ------------------------------------------------------------------------------------------------ CDP client
class CDPError(RuntimeError):
    pass


class CDP:
    """A minimal DevTools-protocol client for one page target: aiohttp's websocket on an event loop in a daemon
    thread, synchronous :meth:`call` / :meth:`evaluate` for the tests, every event kept in :attr:`events`."""

    def __init__(self, ws_url: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cdp", daemon=True)
        self.thread.start()
        self.events: list[tuple[str, dict]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._run(self._connect(ws_url), 30)

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self, ws_url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0)  # screenshots are several MB
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        import aiohttp

        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data:
                    fut = self._pending.pop(data["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(data)
                else:
                    self.events.append((data.get("method", ""), data.get("params", {})))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(CDPError("the DevTools websocket closed"))

    async def _call(self, method: str, params: dict, timeout: float) -> dict:
        msg_id = next(self._ids)
        fut = self.loop.create_future()
        self._pending[msg_id] = fut
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        return self._run(self._call(method, params, timeout), timeout + 5)

    def evaluate(self, expression: str, timeout: float = 30.0):
        """The JSON value of a JS expression (promises awaited); a JS exception raises :class:`CDPError`."""
        r = self.call("Runtime.evaluate", timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(f"JS exception: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression, timeout=10)
                if last:
                    return last
            except CDPError as e:  # the page is still navigating
                last = e
            time.sleep(0.25)  # polling, not timing
        raise TimeoutError(f"{what} not within {timeout:.0f} s (last: {last!r})")

    def of(self, method: str) -> list[dict]:
        return [p for m, p in list(self.events) if m == method]

    def close(self) -> None:
        async def _close():
            await self.ws.close()
            await self.session.close()
            self.reader.cancel()

        try:
            self._run(_close(), 10)
        except Exception:  # Chromium may already be gone
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


# ------------------------------------------------------------------------------------------------ console messages
def console_messages(cdp: CDP) -> list[dict]:
    """Every console message, exception and browser log entry as {kind, level, text, where} (where: URLs)."""
    out = []
    for p in cdp.of("Runtime.consoleAPICalled"):
        text = " ".join(str(a.get("value", a.get("description", a.get("type")))) for a in p.get("args", []))
        urls = [f.get("url", "") for f in p.get("stackTrace", {}).get("callFrames", [])]
        out.append({"kind": "console", "level": p.get("type"), "text": text, "where": urls})
    for p in cdp.of("Runtime.exceptionThrown"):
        d = p.get("exceptionDetails", {})
        text = d.get("exception", {}).get("description") or d.get("text", "")
        urls = [d.get("url", "")] + [f.get("url", "") for f in d.get("stackTrace", {}).get("callFrames", [])]
        out.append({"kind": "exception", "level": "error", "text": text, "where": urls})
    for p in cdp.of("Log.entryAdded"):
        e = p.get("entry", {})
        out.append({"kind": f"log/{e.get('source')}", "level": e.get("level"), "text": e.get("text", ""),
                    "where": [e.get("url", "")]})
    return out


def is_ours(msg: dict) -> bool:
    return bool(re.search(r"unlearn", msg["text"] + " " + " ".join(msg["where"]), re.IGNORECASE))


def tolerated_reason(msg: dict) -> str | None:
    blob = msg["text"] + " " + " ".join(msg["where"])
    return next((why for pattern, why in TOLERATED if pattern.search(blob)), None)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature, IHDR and that its IDAT stream inflates."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    assert len(raw) >= height * (width + 1), "truncated image data"
    return width, height


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed: apt-get install chromium (or set UNLEARN_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    try:
        root = comfyui_dir()
    except ComfyUnavailable as e:
        pytest.skip(f"ComfyUI unavailable: {e}")
    base = tmp_path_factory.mktemp("comfyui-base")
    # Not a first visit: without this the front end opens its template browser over the canvas.
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    # the generated random SD1.5 checkpoint (cached; the same file the server tests use): one real training run
    srv = ComfyServer(root, base, sd15_checkpoint(root))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    env = os.environ.get("UNLEARN_ARTIFACTS")
    path = Path(env) if env else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    """A headless Chromium on a free DevTools port, and a CDP connection to its page (Runtime, Log, Page, Network
    enabled: console messages, exceptions and responses are recorded from the start)."""
    tmp = tmp_path_factory.mktemp("chromium")
    profile, log_path = tmp / "profile", tmp / "chromium.log"
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
           "--disable-background-networking", "--remote-debugging-port=0", f"--user-data-dir={profile}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"]
    log = open(log_path, "wb")  # closed at teardown
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cdp = None
    try:
        # Port 0: Chromium picks a free port and writes it to DevToolsActivePort (no race with other processes).
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start (exit {proc.poll()}):\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)  # polling for start-up
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as r:
            targets = json.load(r)
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            raise RuntimeError(f"no page target among Chromium's DevTools targets: {targets}")
        cdp = CDP(page["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page", "Network"):
            cdp.call(f"{domain}.enable")
        # a fixed viewport (--window-size includes the window frame of headless Chromium)
        cdp.call("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1], deviceScaleFactor=1,
                 mobile=False)
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        kill_group(proc)
        log.close()


@pytest.fixture(scope="module")
def page(browser, server):
    """The front end, loaded: ``window.app`` with its graph and canvas, node definitions and extensions registered
    (the front end sets ``window.app`` only after ``app.setup()`` loaded every extension and node definition)."""
    browser.call("Page.navigate", url=server.url + "/")
    browser.wait_for("!!(window.app && app.graph && app.canvas && window.LiteGraph && app.extensions?.length"
                     " && Object.keys(LiteGraph.registered_node_types).length > 0)", 90, "the front end")
    return browser


@pytest.fixture(scope="module")
def workflow(page):
    """Example 01 loaded with ``app.loadGraphData``; every node's widget values and the missing node types the
    front end reported (its ``showMissingNodesError`` is wrapped to record them)."""
    data = json.loads(EXAMPLE.read_text())
    result = page.evaluate(f"""(async () => {{
        const app = window.app;
        window.__unlearnMissing = [];
        const show = app.showMissingNodesError.bind(app);
        app.showMissingNodesError = (types) => {{ window.__unlearnMissing.push(...types); return show(types); }};
        await app.loadGraphData({json.dumps(data)});
        await new Promise((r) => requestAnimationFrame(() => r()));
        return {{
            missing: window.__unlearnMissing,
            nodes: app.graph.nodes.map((n) => ({{
                id: n.id, type: n.type, title: n.title,
                widgets: (n.widgets || []).map((w) => ({{name: w.name, value: w.value}})),
                has_errors: !!n.has_errors,
            }})),
            serialized: app.graph.serialize().nodes.map((n) => ({{id: n.id, widgets_values: n.widgets_values}})),
            dialogs: [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText),
        }};
    }})()""", timeout=60)
    # Close the dialogs (the missing-models one: the server lacks the example's checkpoint) so the screenshots show the canvas.
    result["open_after_close"] = page.evaluate("""(async () => {
        for (let i = 0; i < 5 && document.querySelector(".p-dialog"); i++) {
            document.querySelector(".p-dialog .p-dialog-close-button")?.click();
            await new Promise((r) => setTimeout(r, 300));
        }
        return [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText);
    })()""")
    result["file"] = data
    return result


def screenshot(cdp: CDP, path: Path) -> bytes:
    data = base64.b64decode(cdp.call("Page.captureScreenshot", 60, format="png")["data"])
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def loaded_screenshot(workflow, page, artifacts) -> tuple[Path, bytes]:
    page.evaluate("(async () => { app.canvas.draw(true, true); "
                  "await new Promise((r) => requestAnimationFrame(() => r())); })()")
    path = artifacts / "frontend.png"
    return path, screenshot(page, path)


CHART_EVENTS = [
    {"reset": True, "names": ["x"]},
    {"step": 0, "total": 10, "loss": 1.5},
    {"step": 0, "lambda": [0.25], "slack": [-0.5]},
    {"step": 1, "total": 10, "loss": 1.25},
    {"step": 2, "total": 10, "loss": 0.75},
    {"step": 2, "lambda": [0.5], "slack": [0.125]},
    {"step": 3, "total": 10, "loss": None},  # the server sends null for a non-finite loss
    {"step": 3, "lambda": [None], "slack": [None]},  # … and for a non-finite λ
]


# A forced redraw at scale 1 centred on ``node``, the canvas context's fillText recorded: resolves to the texts drawn.
REDRAW_RECORDING = """async function redrawRecording(app, node) {
            app.canvas.ds.scale = 1;
            app.canvas.centerOnNode(node);
            const ctx = app.canvas.ctx, texts = [];
            const fillText = ctx.fillText;
            ctx.fillText = function (t, ...rest) { texts.push(String(t)); return fillText.call(this, t, ...rest); };
            try { app.canvas.draw(true, true); } finally { delete ctx.fillText; }
            await new Promise((r) => requestAnimationFrame(() => r()));
            return texts;
        }"""


@pytest.fixture(scope="module")
def chart(workflow, page, loaded_screenshot, artifacts):
    """Fake "unlearn.progress" events for the Unlearn Concept node, dispatched through the front end's api object
    (what its websocket handler does with a message of a type an extension listens to), then a forced redraw
    centred on the node with the canvas context's fillText recorded."""
    (node_id,) = [n["id"] for n in workflow["nodes"] if n["type"] == "Unlearn_UnlearnConcept"]
    events = [{"node": str(node_id), **e} for e in CHART_EVENTS]
    result = page.evaluate(f"""(async () => {{
        {REDRAW_RECORDING}
        const app = window.app, api = window.comfyAPI.api.api;
        const node = app.graph.getNodeById({json.dumps(node_id)});
        const before = [...node.size];
        for (const detail of {json.dumps(events)}) api.dispatchCustomEvent("unlearn.progress", detail);
        // an event for a node that is not in the graph is ignored
        api.dispatchCustomEvent("unlearn.progress", {{node: "99999", step: 0, total: 1, loss: 1}});
        const texts = await redrawRecording(app, node);
        const prompt = await app.graphToPrompt();
        return {{series: node.unlearnSeries, before, after: [...node.size], texts,
                 widgets: node.widgets.map((w) => ({{name: w.name, y: w.y, height: w.computedHeight}})),
                 prompt_inputs: Object.keys(prompt.output[String(node.id)].inputs),
                 saved: prompt.workflow.nodes.find((n) => n.id === node.id).widgets_values}};
    }})()""")
    result["node_id"] = node_id
    result["file_values"] = next(n for n in workflow["file"]["nodes"] if n["id"] == node_id)["widgets_values"]
    result["png"] = screenshot(page, artifacts / "frontend-chart.png")
    return result


# Widget values for the real run, by node type: one wording, two steps at 64×64 on the random checkpoint (the
# trainer draws 8 samples per wording and step: ~20 s a step here), samplers at 2 steps.
REAL_RUN = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2, "cfg": 1.0},
    "Unlearn_UnlearnConcept": {"concept": "Van Gogh", "steps": 2, "width": 64, "height": 64, "batch": 1,
                               "trajectory_steps": 2, "learning_rate": 0.05},
    "Unlearn_SaveUnlearningLora": {"filename": "browser_run"},
}


@pytest.fixture(scope="module")
def real_run(workflow, page, chart, server, artifacts):
    """The loaded example, set to the tiny values above and queued from the page (``app.queuePrompt``, what the
    Queue button does); the chart is then fed by the server's own "unlearn.progress" messages over the page's
    websocket. Waits for the prompt in /history, then redraws the node as ``chart`` does."""
    (node_id,) = [n["id"] for n in workflow["nodes"] if n["type"] == "Unlearn_UnlearnConcept"]
    before = set(server.get("/history"))
    page.evaluate(f"""(async () => {{
        const app = window.app;
        for (const [type, values] of Object.entries({json.dumps(REAL_RUN)})) {{
            const nodes = app.graph.nodes.filter((n) => n.type === type);
            if (!nodes.length) throw new Error(`no ${{type}} node`);
            for (const n of nodes) for (const [name, value] of Object.entries(values)) {{
                const w = n.widgets.find((w) => w.name === name);
                if (!w) throw new Error(`${{type}} has no widget ${{name}}`);
                w.value = value;
            }}
        }}
        await app.queuePrompt(0, 1);
    }})()""", timeout=60)
    deadline, entry = time.monotonic() + 900, None
    while time.monotonic() < deadline:
        new = {k: v for k, v in server.get("/history").items() if k not in before}
        entry = next(iter(new.values()), None)
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            break
        if entry is not None and entry.get("status", {}).get("status_str") == "error":
            break
        time.sleep(1)  # polling the server, not timing
    assert entry is not None, "the queued workflow did not reach /history within 15 min:\n" + server.log()[-3000:]
    result = page.evaluate(f"""(async () => {{
        {REDRAW_RECORDING}
        const app = window.app;
        const node = app.graph.getNodeById({json.dumps(node_id)});
        const texts = await redrawRecording(app, node);
        return {{series: node.unlearnSeries, texts}};
    }})()""")
    result["status"] = entry["status"]
    result["lora"] = server.loras / "browser_run.safetensors"
    result["png"] = screenshot(page, artifacts / "frontend-real-run.png")
    return result


# ------------------------------------------------------------------------------------------------ tests
def test_front_end_loads_and_registers_our_extension(page, server):
    names = page.evaluate("app.extensions.map((e) => e.name)")
    assert EXTENSION in names, f"{EXTENSION} not among {len(names)} registered extensions: {names}"
    by_url = {}
    for p in page.of("Network.responseReceived"):
        by_url.setdefault(p["response"]["url"], []).append(p["response"]["status"])
    assert 200 in by_url.get(server.url + EXTENSION_JS, []), \
        f"{EXTENSION_JS} not loaded: {sorted(u for u in by_url if 'extensions' in u)}"
    urls = {p["requestId"]: p["request"]["url"] for p in page.of("Network.requestWillBeSent")}
    failed = [(urls.get(p["requestId"]), p["errorText"]) for p in page.of("Network.loadingFailed")]
    assert not [f for f in failed if "Unlearn" in str(f[0])], failed


def test_our_nodes_are_in_the_node_library(page):
    types = page.evaluate(f"""Object.fromEntries({json.dumps(NODE_IDS)}.map((t) => [t,
        LiteGraph.registered_node_types[t] ? {{category: LiteGraph.registered_node_types[t].category,
                                              title: LiteGraph.registered_node_types[t].title}} : null]))""")
    for node_id in NODE_IDS:
        assert types[node_id] is not None, f"{node_id} is not a registered node type"
        assert types[node_id]["category"].startswith("unlearning/"), (node_id, types[node_id])


def test_example_workflow_opens_with_its_widget_values(workflow):
    assert workflow["missing"] == [], f"missing node types: {workflow['missing']}"
    # The only dialog expected: "Missing Models", the example's checkpoint is not on the server (only the random one).
    assert all("Missing Models" in d and "checkpoints / v1-5-pruned-emaonly-fp16" in d for d in workflow["dialogs"]), \
        workflow["dialogs"]
    assert not workflow["open_after_close"], workflow["open_after_close"]
    file_nodes = {n["id"]: n for n in workflow["file"]["nodes"]}
    graph_nodes = {n["id"]: n for n in workflow["nodes"]}
    assert set(graph_nodes) == set(file_nodes)
    ours = [n for n in graph_nodes.values() if n["type"].startswith("Unlearn_")]
    assert {n["type"] for n in ours} == {"Unlearn_UnlearnConcept", "Unlearn_SaveUnlearningLora"}
    for n in ours:
        # The widgets in order (seed's control_after_generate included) are what the file saved.
        assert [w["value"] for w in n["widgets"]] == file_nodes[n["id"]]["widgets_values"], n["type"]
        assert not n["has_errors"], n
    concept = next(n for n in ours if n["type"] == "Unlearn_UnlearnConcept")
    widgets = {w["name"]: w["value"] for w in concept["widgets"]}
    assert widgets["concept"] == "Van Gogh | painting by Van Gogh | in the style of Vincent van Gogh"
    assert widgets["method"] == "RU" and widgets["steps"] == 200 and widgets["targets"] == "xattn"
    # … and saving the graph gives the file's values back, for every node
    saved = {n["id"]: n.get("widgets_values") for n in workflow["serialized"]}
    for nid, n in file_nodes.items():
        assert saved[nid] == n.get("widgets_values", saved[nid]), (nid, n["type"])


def test_screenshot_of_the_loaded_workflow_is_a_png(loaded_screenshot):
    path, data = loaded_screenshot
    assert path.is_file() and len(data) > 20_000, (path, len(data))
    width, height = png_size(data)
    assert (width, height) == WINDOW, (width, height)


def test_progress_events_feed_the_chart_and_it_draws(chart):
    s = chart["series"]
    assert s["names"] == ["x"]
    assert s["total"] == 10 and s["step"] == 4  # steps are 0-based in the events, 1-based on the chart
    assert s["loss"] == [[0, 1.5], [1, 1.25], [2, 0.75]]  # the null loss is not plotted
    assert s["lambda"] == [[0, [0.25]], [2, [0.5]], [3, [None]]]
    # The chart is a widget of its own below the others (the multiline boxes, DOM elements over the canvas, grow
    # to fill the node and covered a chart drawn over the node's bottom rows), and the node grew to hold it.
    *others, last = chart["widgets"]
    assert last["name"] == "unlearn_chart" and last["height"] >= 96, chart["widgets"]
    assert all(w["y"] + w["height"] <= last["y"] + 0.5 for w in others), chart["widgets"]
    assert last["y"] + last["height"] <= chart["after"][1] + 4.5, (chart["widgets"], chart["after"])
    assert chart["after"][1] > chart["before"][1]
    # … that is neither an input of the queued prompt nor a saved widget value
    assert "unlearn_chart" not in chart["prompt_inputs"] and "concept" in chart["prompt_inputs"]
    assert chart["saved"] == chart["file_values"]
    texts = chart["texts"]
    assert "step 4/10" in texts, texts
    assert "loss 0.750" in texts, texts
    assert "λ –" in texts, texts  # the last λ was null (non-finite): shown as "–" (toFixed on null threw before)
    width, height = png_size(chart["png"])
    assert (width, height) == WINDOW


def test_a_real_run_queued_from_the_page_feeds_the_chart(real_run):
    """Queued from the page, the example trains on the server, and the chart on the node holds what the server
    sent: a fresh series (the fake events above are gone) named after the concept, both steps' losses, λ from the
    dual update at the last step, drawn as "step 2/2"."""
    assert real_run["status"]["status_str"] == "success", real_run["status"]
    s = real_run["series"]
    assert s["names"] == ["Van Gogh"] and s["total"] == 2 and s["step"] == 2, s
    assert [st for st, _ in s["loss"]] == [0, 1] and all(isinstance(v, float) and v >= 0 for _, v in s["loss"]), s
    assert [st for st, _ in s["lambda"]] == [1] and len(s["lambda"][0][1]) == 1, s
    lam = s["lambda"][0][1][0]
    assert isinstance(lam, (int, float)) and 0 <= lam <= 1, s
    assert "step 2/2" in real_run["texts"], real_run["texts"]
    assert real_run["lora"].is_file()  # the graph ran to its end: the Save node wrote the LoRA
    assert png_size(real_run["png"]) == WINDOW


def test_no_console_errors_from_our_extension(page, workflow, chart, real_run, artifacts):
    msgs = console_messages(page)
    (artifacts / "console.json").write_text(json.dumps(msgs, indent=1))
    # The front end asks api.comfy.org about the node types of a loaded workflow (.../comfy-nodes/Unlearn_…/node):
    # without internet that fails and names our nodes, but it is the front end's request, tolerated below.
    ours = [m for m in msgs if is_ours(m) and (m["level"] in ("error", "warning") or m["kind"] == "exception")
            and tolerated_reason(m) is None]
    assert not ours, "console errors/warnings from ComfyUI-Unlearn:\n" + json.dumps(ours, indent=1)
    errors = [m for m in msgs if m["level"] == "error" or m["kind"] == "exception"]
    unexplained = [m for m in errors if tolerated_reason(m) is None]
    tolerated = [f"{tolerated_reason(m)}: {m['text'][:160]} {m['where'][0] if m['where'] else ''}"
                 for m in errors if tolerated_reason(m)]
    assert not unexplained, ("console errors not known to be unrelated to us:\n" + json.dumps(unexplained, indent=1)
                             + "\ntolerated:\n" + "\n".join(tolerated))
