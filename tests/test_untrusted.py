"""Untrusted adapter files: every damaged or hostile file is a clear LoraYoloError, fast, and nothing is executed."""

from __future__ import annotations

import json
import random
import struct
import time

import pytest
from conftest import random_adapter, script_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_yolo import LoraYoloError, load_adapter, save_adapter

FUZZ_CASES = 300  # per property; CI runs all of them (derandomized, so every run checks the same cases)
STRUCTURED_CASES = 240  # scripts/fuzz_adapters.py's crafted adapters and PEFT folders, half each


@pytest.fixture(scope="module")
def good(base_pt, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "a.safetensors"
    save_adapter(random_adapter(base_pt)[1], path)
    return path.read_bytes()


def load_bytes(tmp_path, data: bytes):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        return load_adapter(path)
    finally:
        assert time.perf_counter() - start < 2.0  # bounded time, whatever the file says


def header_of(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n])


def with_header(data: bytes, header: dict) -> bytes:
    """Same tensor bytes, another (possibly lying) header."""
    n = struct.unpack("<Q", data[:8])[0]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: b"", "empty or truncated"),
        (lambda d: d[: len(d) // 2], "truncated|damaged"),
        (lambda d: d[:100], "truncated"),
        (lambda d: struct.pack("<Q", 1 << 40) + d[8:], "header"),
        (lambda d: struct.pack("<Q", 16) + b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01" + d[24:], "not a safetensors"),
        (lambda d: b"PK\x03\x04" + d[4:], "header"),  # a zip (.pt) renamed
    ],
    ids=["empty", "half", "100-bytes", "huge-header", "pickle-header", "zip-magic"],
)
def test_damaged_files_are_refused(good, tmp_path, make, message):
    with pytest.raises(LoraYoloError, match=message):
        load_bytes(tmp_path, make(good))


def test_pt_checkpoint_renamed_is_refused(base_pt, tmp_path):
    with pytest.raises(LoraYoloError):
        load_bytes(tmp_path, base_pt.read_bytes())


def test_header_lying_about_shapes_or_offsets(good, tmp_path):
    header = header_of(good)
    name = next(k for k in header if k != "__metadata__")
    for lie in ({"shape": [10**6, 10**6]}, {"data_offsets": [0, 10**12]}, {"dtype": "I64"}, {"shape": [-1]}):
        liar = {**header, name: {**header[name], **lie}}
        with pytest.raises(LoraYoloError, match="damaged|inconsistent"):
            load_bytes(tmp_path, with_header(good, liar))


@pytest.mark.parametrize(
    "key, value",
    [("names", "[1, 2]"), ("layers", "7"), ("lora_config", "[]"), ("nc", "x"), ("base", "null"), ("full", "{bad json")],
)
def test_metadata_of_the_wrong_shape(good, tmp_path, key, value):
    header = header_of(good)
    with pytest.raises(LoraYoloError):
        load_bytes(tmp_path, with_header(good, {**header, "__metadata__": {**header["__metadata__"], key: value}}))


def test_metadata_that_lies_about_layers(good, tmp_path):
    header = header_of(good)
    meta = dict(header["__metadata__"])
    layers = json.loads(meta["layers"])
    layers[next(iter(layers))][0] = 99  # claims rank 99 for a rank-8 tensor pair
    meta["layers"] = json.dumps(layers)
    with pytest.raises(LoraYoloError, match="inconsistent"):
        load_bytes(tmp_path, with_header(good, {**header, "__metadata__": meta}))


FUZZ_SETTINGS = settings(
    max_examples=FUZZ_CASES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def test_fuzz_bit_flips_and_truncation(good, tmp_path):
    ran = []

    @FUZZ_SETTINGS
    @given(st.data())
    def case(data):
        ran.append(1)
        blob = bytearray(good)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
        cut = data.draw(st.one_of(st.none(), st.integers(0, len(blob))))
        blob = bytes(blob[:cut] if cut is not None else blob)
        try:
            adapter = load_bytes(tmp_path, blob)
        except LoraYoloError:
            return
        # A flip inside tensor data (or padding) still loads: the values changed, the structure is intact.
        assert all(t.is_floating_point() for t in adapter.tensors.values())

    case()
    assert len(ran) >= FUZZ_CASES  # every intended case ran (hypothesis stops early on an exhausted space)


def test_fuzz_arbitrary_headers(good, tmp_path):
    ran = []

    @FUZZ_SETTINGS
    @given(header=st.dictionaries(st.text(max_size=20), JSON_VALUES, max_size=6))
    def case(header):
        ran.append(1)
        with pytest.raises(LoraYoloError):
            load_bytes(tmp_path, with_header(good, header))

    case()
    assert len(ran) >= FUZZ_CASES


def test_fuzz_metadata_values_of_every_shape(good, tmp_path):
    """Each metadata field replaced by arbitrary JSON (or text that is not JSON): the loader refuses or, when the
    value happens to be valid, loads; nothing else."""
    header, ran = header_of(good), []
    keys = sorted(header["__metadata__"])

    @FUZZ_SETTINGS
    @given(key=st.sampled_from(keys), value=JSON_VALUES.map(json.dumps) | st.text(max_size=30))
    def case(key, value):
        ran.append(1)
        meta = {**header["__metadata__"], key: value}
        try:
            load_bytes(tmp_path, with_header(good, {**header, "__metadata__": meta}))
        except LoraYoloError:
            pass

    case()
    assert len(ran) >= FUZZ_CASES


def fuzz_script():
    """scripts/fuzz_adapters.py as a module: the tests run its structure-aware cases, the script runs thousands."""
    return script_module("fuzz_adapters")


def test_structure_aware_fuzz_of_both_loaders(tmp_path):
    """Crafted adapters and PEFT folders (ranks 0, NaN alphas, layers naming BatchNorms, missing modules, nc and
    names that disagree, add_classes adapters broken where their checks are, configs of the wrong type, bad regexes,
    empty adapters, deep JSON...) through load and attach: each case loads or is refused with a LoraYoloError, within
    5 s."""
    script = fuzz_script()
    fuzzer = script.Fuzzer(tmp_path, hang=5.0)
    for seed in range(STRUCTURED_CASES):
        fuzzer.run(seed, ("adapter", "peft")[seed % 2])
    assert fuzzer.cases == STRUCTURED_CASES
    assert not fuzzer.crashes, fuzzer.crashes[0]
    assert fuzzer.hangs == 0
    for loader in ("adapter", "peft"):  # the generator reaches both outcomes, so it tests something
        assert fuzzer.outcomes[(loader, "ok")] > 0 and fuzzer.outcomes[(loader, "refused")] > STRUCTURED_CASES // 4
    used = {name for name, _ in fuzzer.outcomes if name.startswith("m_")}
    assert used == {m.__name__ for m in script.ADAPTER_MUTATIONS + script.PEFT_MUTATIONS}


def test_each_way_the_fuzzer_breaks_an_add_classes_or_train_head_adapter_is_refused(tmp_path):
    """The fuzzer's add_classes adapter (adapted mode: LoRA outside the class branches, a copy of each) loads and
    attaches intact, and each way `m_add_classes` breaks it alone is refused (a LoRA layer inside a class branch
    would otherwise be dropped silently, exact mode's LoRA layers would change the base's outputs)."""
    script = fuzz_script()
    fuzzer = script.Fuzzer(tmp_path, hang=5.0)
    for op, what in enumerate(script.ADD_CLASSES_BREAKS):
        case = script.Case({}, {})
        script.add_classes_case(case, fuzzer.context, op, random.Random(op))
        assert fuzzer.check(case, "adapter", what) == ("ok" if op == 0 else "refused"), what
    for op, what in enumerate(script.TRAIN_HEAD_BREAKS):  # a train_head adapter, intact and broken each way alone
        case = script.Case({}, {})
        script.train_head_case(case, fuzzer.context, op, random.Random(op))
        assert fuzzer.check(case, "adapter", what) == ("ok" if op == 0 else "refused"), what
    assert not fuzzer.crashes
