"""Malformed LoRA files: each is refused with one clean line naming the file, or loads and applies completely.

A seeded corpus of more than a thousand files is derived from three valid LoRAs written by ``save_lora`` for a
tiny diffusers UNet: truncations, wrong header-length fields, corrupted header JSON, hostile metadata, keys that
are not LoRA keys, LoRA tensors whose shapes do not fit together, NaN/inf weights, pickles and zips renamed to
``.safetensors``, empty files and folders. For every file:

* ``load_lora`` returns a complete :class:`LoraFile` (every ``lora_unet_`` module in the header is in it) or
  raises :class:`LoraFormatError` whose message is one line naming the file — never another exception;
* ``apply_lora`` onto the UNet either succeeds (and ``strip`` gives back the exact weights) or raises
  :class:`LoraFormatError` with every weight of the UNet bit-for-bit unchanged;
* ``comfyui-unlearn inspect`` (on a sample of over 200) exits 2 with one ``error:`` line and no traceback, or
  exits 0 printing only printable text.

NaN and inf are refused by design: a LoRA holding them turns every image it touches into noise, and so is an
alpha or a weight large enough that applying it overflows the model's weights.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save
from unet_configs import TINY

from unlearn_core import cli, unlearn
from unlearn_core import lora as L
from unlearn_core.lora import LoraFormatError, LoraModule

SEED = 8
INSPECT_EVERY = 5  # every 5th case of each family also goes through the inspect CLI

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
MID = "mid_block.attentions.0.transformer_blocks.0"
# (modules, rank, alpha, dtype, metadata?) of the three valid files the corpus is derived from
BASES = [
    ([f"{ATTN}.attn2.to_k", f"{ATTN}.attn2.to_v", f"{MID}.attn1.to_q", "down_blocks.0.resnets.0.conv1"], 2, 3.0,
     "fp32", True),
    ([f"{ATTN}.attn1.to_out.0", f"{MID}.ff.net.2", "down_blocks.0.attentions.0.proj_in"], 1, 1.0, "fp16", False),
    ([f"{MID}.attn2.to_k", "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v"], 3, 0.75, "bf16", True),
]


# ---------------------------------------------------------------------------------------------------- raw files
def _split(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _raw(header: bytes | str, data: bytes = b"", n: int | None = None) -> bytes:
    h = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(h) if n is None else n % 2**64) + h + data


def _join(header: object, data: bytes) -> bytes:
    return _raw(json.dumps(header, separators=(",", ":")), data)


def _tensors(base: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    header, _ = _split(base["blob"])
    return dict(load(base["blob"])), dict(header.get("__metadata__", {}))


def _entries(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# ---------------------------------------------------------------------------------------------------- families
def _truncated(rng, bases):
    out = []
    for i in range(150):
        b = rng.choice(bases)["blob"]
        n = struct.unpack("<Q", b[:8])[0]
        if i < 12:
            cut = [0, 1, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, len(b) - 1, len(b) - 2, len(b) - 4, 10][i]
        elif i % 2:
            cut = rng.randrange(0, 8 + n)
        else:
            cut = rng.randrange(8 + n, len(b))
        out.append(b[:cut])
    return out


def _header_length(rng, bases):
    out = []
    for i in range(100):
        b = rng.choice(bases)["blob"]
        n, rest = struct.unpack("<Q", b[:8])[0], b[8:]
        kind = i % 8
        value = {0: n + rng.randint(1, 64), 1: n - rng.randint(1, min(n, 64)), 2: rng.randrange(2**32, 2**63),
                 3: 0, 4: -rng.randint(1, 2**31), 5: rng.randrange(2**64), 6: len(rest) + rng.randint(0, 5),
                 7: n + len(rest)}[kind]
        out.append(_raw(rest, n=value))
    for extra in (1, 2, 1000):  # above the header limit but inside the file: a sparse 64 MB file
        out.append(("sparse", L.MAX_HEADER_BYTES + extra))
    return out


def _header_bytes(rng, bases):
    out = []
    for _ in range(150):
        b = bytearray(rng.choice(bases)["blob"])
        n = struct.unpack("<Q", b[:8])[0]
        for _ in range(rng.randint(1, 4)):
            pos = 8 + rng.randrange(n)
            b[pos] = rng.randrange(256) if rng.random() < 0.5 else b[pos] ^ (1 << rng.randrange(8))
        out.append(bytes(b))
    return out


def _data_bytes(rng, bases):
    out = []
    for _ in range(50):
        b = bytearray(rng.choice(bases)["blob"])
        n = struct.unpack("<Q", b[:8])[0]
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(8 + n, len(b))
            b[pos] = rng.randrange(256)
        out.append(bytes(b))
    return out


_BAD_VALUES = [None, True, 1.5, "x", [], {}, [[0]], -1, 2**64, 10**30, [1, 2, 3], {"a": 1}]


def _header_json(rng, bases):
    out: list = [_raw(t) for t in (b"", b"{", b'{"a":', b"nul", b"\xff\xfe{}", b"{}}", b"[]", b"1", b'"x"',
                                   b"null", b"true", b"{'a': 1}", b"{\x00}", b"{" + b" " * 50)]
    out += [_raw("[" * d + "]" * d) for d in (10**3, 10**5)]
    out += [_raw('{"a":' * d + "1" + "}" * d) for d in (10**3, 10**5)]
    out += [_raw(rng.randbytes(rng.randint(1, 300))) for _ in range(20)]
    while len(out) < 250:
        base = rng.choice(bases)
        header, data = _split(base["blob"])
        keys = _entries(header)
        k = rng.choice(keys)
        e = header[k]
        m = rng.randrange(18)
        if m == 0:  # a field missing
            for f in rng.sample(["dtype", "shape", "data_offsets"], rng.randint(1, 3)):
                del e[f]
        elif m == 1:  # the entry is not an object
            header[k] = rng.choice(_BAD_VALUES[:5] + [[1, 2]])
        elif m == 2:  # offsets past the end
            e["data_offsets"] = [e["data_offsets"][0], len(data) + rng.randint(1, 10**6)]
        elif m == 3:  # offsets reversed
            e["data_offsets"] = e["data_offsets"][::-1]
        elif m == 4:  # two tensors overlap (same size, same place)
            other = rng.choice(keys)
            e.update({"dtype": header[other]["dtype"], "shape": header[other]["shape"],
                      "data_offsets": header[other]["data_offsets"]})
        elif m == 5:  # a gap: every tensor moved forward, the data padded at the end
            shift = rng.choice([1, 2, 4, 8])
            for kk in keys:
                header[kk]["data_offsets"] = [o + shift for o in header[kk]["data_offsets"]]
            data = data + bytes(shift)
        elif m == 6:  # the data is not covered: one tensor missing from the header
            del header[k]
        elif m == 7:  # offsets of the wrong arity or type
            e["data_offsets"] = rng.choice([[0], [0, 1, 2], [], "0,4", [0.0, 4.0], [None, 4], [True, 4], 7,
                                            [-4, 0], [2**64, 2**64 + 4], [0, 2**70]])
        elif m == 8:  # unknown or non-string dtype
            e["dtype"] = rng.choice(["F128", "f32", "", "Q4_0", "F8_E8M0", "float32", 4, None, ["F32"], {"F": 32},
                                     "F32 ", "I4"])
        elif m == 9:  # a valid dtype of the same item size: the tensor loads as integers or bools
            size = {"F32": ["I32", "U32"], "F16": ["I16", "U16"], "BF16": ["I16", "F16"]}.get(e["dtype"], ["I32"])
            e["dtype"] = rng.choice(size)
        elif m == 10:  # a valid dtype of another item size: byte count no longer matches the shape
            e["dtype"] = rng.choice(["F64", "U8", "BOOL", "I64", "F8_E4M3"])
        elif m == 11:  # shape disagrees with the byte count
            shape = list(e["shape"]) or [1]
            j = rng.randrange(len(shape))
            shape[j] += rng.choice([-1, 1, 7])
            e["shape"] = shape
        elif m == 12:  # negative, fractional, boolean, huge or non-numeric dims
            shape = list(e["shape"]) or [1]
            shape[rng.randrange(len(shape))] = rng.choice([-1, -2**63, 1.0, 2.5, True, None, "2", 2**64, 2**70])
            e["shape"] = shape
        elif m == 13:  # shape is not a list
            e["shape"] = rng.choice([2, "2,2", {"0": 2}, None, True])
        elif m == 14:  # zero dims with offsets kept: size mismatch unless the tensor was empty
            e["shape"] = [0, *e["shape"][1:]]
        elif m == 15:  # a duplicated entry in the JSON text (json.loads keeps the last one)
            text = json.dumps(header, separators=(",", ":"))
            dup = json.dumps({k: header[rng.choice(keys)]}, separators=(",", ":"))[1:-1]
            out.append(_raw("{" + dup + "," + text[1:], data))
            continue
        elif m == 16:  # a lone surrogate in a tensor name or a metadata string
            text = json.dumps(header, separators=(",", ":"))
            text = text.replace(k, k + "\\ud800", 1) if rng.random() < 0.5 else text.replace(
                '"__metadata__":{', '"__metadata__":{"x\\udfff":"y",', 1)
            out.append(_raw(text, data))
            continue
        else:  # many empty tensors with names that are not LoRA keys
            for j in range(rng.choice([10, 1000, 5000])):
                header[f"t{j}"] = {"dtype": "F32", "shape": [0], "data_offsets": [len(data), len(data)]}
        out.append(_join(header, data))
    return out


def _hostile_metadata(rng) -> dict:
    big = {"constraints": ["[1,2]", "{}", "null", '[{"name": []}]', "[[1]]", '[{"requested": "x"}]', "5", "[",
                           '[{"name": "a", "units": {"b": 1}}]'],
           "evaluation": ["[1]", "5", "null", '"x"', "{", '{"a": {"b": [1]}}'],
           "concepts": ["5", "null", '{"a": 1}', "[[1]]", "[", '"three"', "[null]"]}
    field = rng.choice(sorted(big))
    md = {"unlearn.method": rng.choice(["ru", "\x1b[31mred\x1b[0m", "a\nb", "", "x" * 10**5]),
          f"unlearn.{field}": rng.choice(big[field])}
    if rng.random() < 0.3:
        md["unlearn.family"] = rng.choice(["sdxl", "sd1", "nonsense", ""])
    if rng.random() < 0.3:
        md["ss_base_model_version"] = rng.choice(["sdxl_base_v1-0", "sd_v1", "garbage"])
    if rng.random() < 0.3:
        md["note\u202eevil"] = "\r\x07\x00\u2028" + "z" * rng.randint(0, 500)
    return md


def _metadata(rng, bases):
    out: list = []
    limit = L.MAX_METADATA_BYTES
    header, data = _split(bases[1]["blob"])
    for md in ({"a": "x" * (limit + 1)}, {f"k{i}": "x" * 1024 for i in range(limit // 1024 + 1)},
               {"euro": "€" * (limit // 3 + 1)}):
        out.append(_join({**header, "__metadata__": md}, data))
    while len(out) < 120:
        header, data = _split(rng.choice(bases)["blob"])
        m = rng.randrange(4)
        if m == 0:  # non-string values, nested objects
            header["__metadata__"] = {"ok": "1", rng.choice(["x", "unlearn.method", "ss_network_dim"]):
                                      rng.choice(_BAD_VALUES + [{"a": {"b": {"c": []}}}])}
        elif m == 1:  # metadata that is not an object
            header["__metadata__"] = rng.choice([[], ["a", "b"], "x", 5, True, [{"a": "b"}]])
        else:  # strings, but hostile to whoever parses or prints them
            header["__metadata__"] = _hostile_metadata(rng)
        out.append(_join(header, data))
    return out


def _names(rng, bases):
    out = []
    renames = ["", "x", "lora_unet_", "lora_unet_no_such_module", "lora_te_text_model_encoder_layers_0_mlp_fc1",
               "lora_te1_x", "LORA_UNET_down_blocks_0", "lora_unet_down.blocks.0", "lora_unet_ü", "lora_unet_" + "a" * 5000,
               "model.diffusion_model.input_blocks.1.1.proj_in", "lora_unet_a b", "lora_unet_a\nb", "../../etc/passwd"]
    suffixes = [".lora_mid.weight", ".hada_w1_a", ".lokr_w1", ".dora_scale", ".diff", ".lora_down.bias", ".weight",
                ".lora_A.weight", "", ".alpha.x"]
    for i in range(80):
        base = rng.choice(bases)
        tensors, md = _tensors(base)
        keys = sorted(tensors)
        k = rng.choice(keys)
        module, _, suffix = k.partition(".")
        if i % 4 == 0:
            new = rng.choice(renames) + "." + suffix
        elif i % 4 == 1:
            new = module + rng.choice(suffixes)
        elif i % 4 == 2:  # the same module under its LDM name as well: two keys would patch one weight
            name = next(n for n in base["modules"] if L.lora_key(n, "demo") == module)
            ldm = L.LORA_PREFIX + L.diffusers_to_ldm(name, base["layout"]).replace(".", "_")
            for s in ("lora_down.weight", "lora_up.weight", "alpha"):
                tensors[f"{ldm}.{s}"] = tensors[f"{module}.{s}"].clone()
            out.append(save(tensors, metadata=md))
            continue
        else:  # every module under its LDM name: a valid alias, applies like the original
            renamed = {}
            for name in base["modules"]:
                src = L.lora_key(name, "demo")
                ldm = L.LORA_PREFIX + L.diffusers_to_ldm(name, base["layout"]).replace(".", "_")
                for s in ("lora_down.weight", "lora_up.weight", "alpha"):
                    renamed[f"{ldm}.{s}"] = tensors[f"{src}.{s}"]
            out.append(save(renamed, metadata=md))
            continue
        tensors[new] = tensors.pop(k)
        out.append(save(tensors, metadata=md))
    return out


def _lora_shapes(rng, bases):
    out = []
    for i in range(120):
        base = rng.choice(bases)
        tensors, md = _tensors(base)
        module = rng.choice(sorted({k.partition(".")[0] for k in tensors}))
        down, up, alpha = (f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha")
        d, u = tensors[down], tensors[up]
        m = i % 20
        if m == 0:
            tensors[down], tensors[up] = u.clone(), d.clone()
        elif m == 1:
            tensors[up] = torch.cat([u, u[:, :1]], 1)
        elif m == 2:
            tensors[down], tensors[up] = d[:0].clone(), u[:, :0].clone()
        elif m == 3:
            tensors[down] = rng.choice([d.flatten(), d.reshape(1, *d.shape), d.reshape(*d.shape, 1, 1, 1)[None]])
        elif m == 4:
            tensors[up] = rng.choice([u.flatten(), u.reshape(1, *u.shape), u.reshape(-1)[0].clone()])
        elif m == 5:  # a 3×3 up kernel: ΔW = B A would not even multiply
            tensors[up] = u.reshape(u.shape[0], u.shape[1], 1, 1).repeat(1, 1, 3, 3).contiguous()
        elif m == 6:
            tensors[up] = u.reshape(u.shape[0], u.shape[1], 1, 1).repeat(1, 1, 1, 2).contiguous()
        elif m == 7:
            tensors[alpha] = rng.choice([torch.ones(2), torch.ones(0), torch.ones(1, 1, 3)])
        elif m == 8:
            tensors[alpha] = torch.tensor(rng.choice([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-45]))
        elif m == 9:  # alpha of an integer or bool dtype: a number all the same
            tensors[alpha] = torch.tensor(rng.choice([2, 1, True]))
        elif m == 10:
            tensors[down] = (d * 100).to(rng.choice([torch.int32, torch.int8, torch.uint8, torch.int64, torch.bool]))
        elif m == 11:
            tensors[up] = u.to(rng.choice([torch.float8_e4m3fn, torch.float8_e5m2]))
        elif m == 12:  # fits the pair, not the model's weight
            tensors[down] = torch.cat([d, d[:, :1]], 1)
        elif m == 13:
            tensors[up] = torch.cat([u, u[:1]], 0)
        elif m == 14:  # half a pair
            del tensors[rng.choice([down, up])]
        elif m == 15:
            del tensors[down], tensors[up]
        elif m == 16:  # a conv LoRA whose down is stored flattened (2-D): the same ΔW, applies
            tensors[down] = d.flatten(1).contiguous()
        elif m == 17:  # finite, but applying it overflows the model's weights
            tensors[alpha] = torch.tensor(3e38)
            tensors[up] = torch.full_like(u, 1e4 if u.dtype == torch.float16 else 1e30)
        elif m == 18:
            tensors = {k: v for k, v in tensors.items() if not k.startswith(module)} or {}
            if not tensors:
                tensors = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 4)}
        else:
            tensors = {} if rng.random() < 0.5 else {f"lora_te_a.{s}": torch.ones(1, 1) for s in
                                                     ("lora_down.weight", "lora_up.weight")}
        out.append(save(tensors, metadata=md))
    return out


def _nonfinite(rng, bases):
    out = []
    for _ in range(40):
        base = rng.choice(bases)
        tensors, md = _tensors(base)
        k = rng.choice(sorted(k for k in tensors if not k.endswith("alpha")))
        t = tensors[k].clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        tensors[k] = t
        out.append(save(tensors, metadata=md))
    return out


def _pickles(rng, bases):
    tensors, _ = _tensors(bases[0])
    objs = [{"a": 1}, tensors, [1, 2, 3], "lora", None, {"state_dict": {"x": torch.zeros(2)}}]
    out = []
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        for obj in objs[:4]:
            out.append(pickle.dumps(obj, protocol=proto))
    for obj in objs:
        buf = io.BytesIO()
        torch.save(obj, buf)
        out.append(buf.getvalue())
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.safetensors", bases[0]["blob"])
    out.append(buf.getvalue())
    out.append(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }" + bytes(8))
    out.append(b"\x1f\x8b\x08\x00" + rng.randbytes(40))  # gzip
    return out


def _garbage(rng, bases):
    header, _ = _split(bases[0]["blob"])
    out: list = [b"", ("dir",), ("broken-link",), ("link-loop",), b"hello", b"{}",
                 json.dumps(header).encode(), b"\x00" * 8, b"\x00" * 9, b"\x02" + b"\x00" * 7 + b"{}",
                 b"\x01" + b"\x00" * 7 + b"{"]
    out += [rng.randbytes(rng.randint(1, 8)) for _ in range(10)]
    out += [rng.randbytes(rng.randint(9, 2000)) for _ in range(19)]
    return out


FAMILIES = {"truncated": _truncated, "header_length": _header_length, "header_bytes": _header_bytes,
            "data_bytes": _data_bytes, "header_json": _header_json, "metadata": _metadata, "names": _names,
            "lora_shapes": _lora_shapes, "nonfinite": _nonfinite, "pickles": _pickles, "garbage": _garbage}


# ---------------------------------------------------------------------------------------------------- corpus
@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY).eval()


def _write(path: Path, payload) -> None:
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    elif payload[0] == "dir":
        path.mkdir()
    elif payload[0] == "broken-link":
        path.symlink_to(path.with_name("nowhere.safetensors"))
    elif payload[0] == "link-loop":
        path.symlink_to(path)
    else:  # ("sparse", header_len): a file big enough to hold the header, without writing 64 MB
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", payload[1]) + b'{"__metadata__":{}}')
            f.truncate(8 + payload[1] + 16)


@pytest.fixture(scope="module")
def corpus(unet, tmp_path_factory) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("fuzz")
    mods = L._weight_modules(unet)
    layout = L.UNetLayout.from_diffusers_config(unet)
    g = torch.Generator().manual_seed(SEED)
    bases = []
    for j, (names, rank, alpha, dtype, with_md) in enumerate(BASES):
        modules = {}
        for name in names:
            w = mods[name].weight
            down_shape = (rank, *w.shape[1:]) if w.dim() == 4 else (rank, w.shape[1])
            up_shape = (w.shape[0], rank, 1, 1) if w.dim() == 4 else (w.shape[0], rank)
            modules[name] = LoraModule(down=torch.randn(down_shape, generator=g) * 0.1,
                                       up=torch.randn(up_shape, generator=g) * 0.1, alpha=alpha)
        md = L.unlearn_metadata(method="ru", concepts=["three"], anchors=[""], steps=5, seed=j, targets="attn",
                                constraints=[{"name": "three", "requested": 1.5, "achieved": 1.4, "lambda": 0.3}],
                                evaluation={"erased_acc": 0.1}) if with_md else None
        path = L.save_lora(folder / f"base{j}.safetensors", modules, family="demo", metadata=md, dtype=dtype)
        bases.append({"blob": path.read_bytes(), "modules": names, "layout": layout})
    rng = random.Random(SEED)
    out: dict[str, list[Path]] = {}
    for family, make in FAMILIES.items():
        out[family] = []
        for i, payload in enumerate(make(rng, bases)):
            path = folder / f"{family}-{i:03d}.safetensors"
            _write(path, payload)
            out[family].append(path)
    return out


# ---------------------------------------------------------------------------------------------------- checks
def _snapshot(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _changed(unet, ref: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in unet.state_dict().items() if not torch.equal(v, ref[k])]


def _lora_modules_in_header(path: Path) -> set[str]:
    header, _ = _split(path.read_bytes())
    return {k.partition(".")[0] for k in header if k.startswith(L.LORA_PREFIX)}


def _clean_error(path: Path, err: Exception) -> str | None:
    """Why ``err`` is not a clean refusal of ``path`` (None if it is)."""
    msg = str(err)
    if type(err) is not LoraFormatError:
        return f"{type(err).__name__}: {msg[:300]}"
    if str(path) not in msg:
        return f"message does not name the file: {msg[:300]}"
    if "\n" in msg or "\r" in msg or len(msg) > 2000:
        return f"message is not one short line: {msg[:300]!r}"
    return None


def _check(path: Path, unet, ref, strength: float) -> tuple[str, str | None]:
    """("loaded" | "applied" | "refused", problem or None) for one file."""
    try:
        lora = L.load_lora(path)
    except Exception as e:  # noqa: BLE001 - the point is to see every kind
        problem = _clean_error(path, e)
        loaded = None
    else:
        problem = None
        loaded = lora
        if set(lora.modules) != _lora_modules_in_header(path):
            return "loaded", f"partial load: {sorted(lora.modules)} vs header {sorted(_lora_modules_in_header(path))}"
    try:  # the path form: load + apply in one call, all or nothing
        applied = L.apply_lora(unet, path, strength)
    except Exception as e:  # noqa: BLE001
        problem = problem or _clean_error(path, e)
        changed = _changed(unet, ref)
        if changed:
            unet.load_state_dict(ref)  # so that one bug is reported once, not by every later file
            return "refused", f"failed apply changed {len(changed)} tensors, e.g. {changed[0]}"
        return ("loaded" if loaded else "refused"), problem
    if loaded is None:
        applied.strip()
        return "applied", f"load_lora refused but apply_lora accepted ({problem})"
    nonfinite = [k for k, v in unet.state_dict().items() if not bool(torch.isfinite(v).all())]
    applied.strip()
    if nonfinite:
        return "applied", f"applied weights are not finite: {nonfinite[0]}"
    changed = _changed(unet, ref)
    if changed:
        unet.load_state_dict(ref)
        return "applied", f"strip did not restore {changed[0]}"
    return "applied", problem


def test_corpus_has_more_than_a_thousand_malformed_files(corpus):
    counts = {f: len(paths) for f, paths in corpus.items()}
    assert sum(counts.values()) >= 1000, counts
    assert min(counts.values()) >= 30, counts


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_file_is_refused_cleanly_or_used_completely(corpus, unet, family):
    ref = _snapshot(unet)
    problems, outcomes = [], Counter()
    for i, path in enumerate(corpus[family]):
        outcome, problem = _check(path, unet, ref, strength=(1.0, -2.0, 0.5)[i % 3])
        outcomes[outcome] += 1
        if problem:
            problems.append(f"{path.name}: {problem}")
    assert not problems, f"{len(problems)} of {len(corpus[family])} files ({dict(outcomes)}):\n" + "\n".join(
        problems[:20])
    if family in ("truncated", "header_length", "nonfinite", "pickles", "garbage"):
        assert outcomes["applied"] == 0, f"{family}: {dict(outcomes)} — every file of this family is broken"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inspect_reports_a_bad_file_on_one_line_with_exit_status_2(corpus, family, capsys):
    problems = []
    sample = corpus[family][::INSPECT_EVERY]
    for path in sample:
        try:
            L.load_lora(path)
            loads = True
        except LoraFormatError:
            loads = False
        rc = cli.main(["inspect", str(path)])
        out, err = capsys.readouterr()
        if loads:
            shown = out.replace("\n", "")
            if rc != 0 or err or not shown.isprintable():
                problems.append(f"{path.name}: rc {rc}, stderr {err[:200]!r}, unprintable output {not shown.isprintable()}")
        else:
            lines = err.splitlines()
            if rc != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or str(path) not in lines[0] or out:
                problems.append(f"{path.name}: rc {rc}, stderr {err[:300]!r}")
    assert not problems, "\n".join(problems[:20])


def test_inspect_sample_covers_more_than_200_files(corpus):
    assert sum(len(paths[::INSPECT_EVERY]) for paths in corpus.values()) >= 200


# ---------------------------------------------------------------------------------------------------- file names
@pytest.mark.parametrize("concept", ["../../etc/passwd", "/abs/path", "a\\b", "..", ".", "...", "a/../../b",
                                     "C:\\evil", "x\x00y", "~/x"])
def test_cli_derives_a_plain_lora_file_name_inside_out_from_any_concept(tmp_path, concept):
    out = tmp_path / "out"
    args = cli.build_parser().parse_args(["unlearn", "--concept", concept, "--out", str(out), "--quiet"])
    job = unlearn.job_from_args(args)
    name = job.lora_path.name
    assert job.lora_path.parent == out and job.partial_path.parent == out
    assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")
    assert os.path.normpath(job.lora_path) == str(out / name)


@pytest.mark.parametrize("folder", ["..", "...", ".hidden", "a b"])
def test_cli_derives_a_plain_lora_file_name_from_any_forget_folder(tmp_path, folder):
    from PIL import Image

    out = tmp_path / "out"
    forget = tmp_path / "imgs" / folder
    forget.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(forget / "x.png")
    args = cli.build_parser().parse_args(["unlearn", "--forget", str(forget), "--out", str(out), "--quiet"])
    job = unlearn.job_from_args(args)
    name = job.lora_path.name
    assert job.lora_path.parent == out and "/" not in name and ".." not in name and not name.startswith(".")
