"""Fuzzing the readers of files that cross the boundary: a clear error or a valid result, never another exception.

Update, model-state, truth and checkpoint files get random header JSON of every type, truncations
at random lengths, and tensors of other dtypes. Whatever comes in, the reader either returns what
the file stands for or raises a :class:`~gradleak.errors.GradleakError` (which the CLI prints as one
line with exit 2): never a TypeError, KeyError, AttributeError or a traceback from a library.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import gradleak
from conftest import make_case
from gradleak.attacks.checkpoint import Checkpointer
from gradleak.errors import GradleakError
from gradleak.threat import load_model_state, load_truth, load_update, save_model_state, save_truth, save_update

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**13, 10**13) | st.floats(allow_nan=True)
                    | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)

UPDATE_KEYS = ["format", "kind", "num_samples", "protocol", "local_steps", "local_lr", "local_batch_size",
               "num_clients", "defenses", "metadata", "parameters"]
SPEC_KEYS = ["name", "num_classes", "image_size", "channels", "activation", "bn_mode", "width"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.bool]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    server, update, images, labels = make_case("mlp", 2, size=8, width=8)
    save_update(update, folder / "update.safetensors")
    save_model_state(server.model, server.spec, folder / "model.safetensors")
    save_truth(images, labels, folder / "truth.safetensors")
    return folder, server


def _header(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["gradleak"])


def _clear_error_or(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except GradleakError as e:
        assert str(e) and "\n" not in str(e).strip(), str(e)
        return None


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(UPDATE_KEYS), JSON, min_size=1, max_size=3),
       drop=st.lists(st.sampled_from(UPDATE_KEYS), max_size=2))
def test_update_header_of_any_json_gives_an_update_or_a_clear_error(files, tmp_path, changes, drop):
    folder, server = files
    tensors, header = _header(folder / "update.safetensors")
    header = {k: v for k, v in {**header, **changes}.items() if k not in drop}
    path = tmp_path / "u.safetensors"
    save_file(tensors, str(path), metadata={"gradleak": json.dumps(header)})
    update = _clear_error_or(load_update, path, model=server.model)
    if update is not None:
        assert isinstance(update.num_samples, int) and 1 <= update.num_samples <= 10**6
        assert all(t.is_floating_point() for t in update.tensors.values())


@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_a_truncated_file_is_a_clear_error(files, tmp_path, cut):
    folder, server = files
    for name, reader in (("update", lambda p: load_update(p, model=server.model)), ("model", load_model_state),
                         ("truth", load_truth)):
        data = (folder / f"{name}.safetensors").read_bytes()
        path = tmp_path / f"{name}-cut.safetensors"
        path.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(GradleakError):
            reader(path)


@FUZZ
@given(dtype=st.sampled_from(DTYPES), which=st.sampled_from(["update", "truth-images", "truth-labels"]))
def test_tensors_of_another_dtype_give_a_clear_error_or_a_valid_result(files, tmp_path, dtype, which):
    folder, server = files
    name = "update" if which == "update" else "truth"
    tensors, header = _header(folder / f"{name}.safetensors")
    key = next(iter(tensors)) if which == "update" else which.split("-")[1]
    tensors[key] = tensors[key].to(dtype)
    path = tmp_path / f"{which}.safetensors"
    save_file(tensors, str(path), metadata={"gradleak": json.dumps(header)})
    if which == "update":
        result = _clear_error_or(load_update, path, model=server.model)
        assert (result is not None) == dtype.is_floating_point
    else:
        result = _clear_error_or(load_truth, path, num_classes=10)
        if result is not None:
            assert result.images.is_floating_point() and result.labels.dtype == torch.int64


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(SPEC_KEYS), JSON, min_size=1, max_size=3), as_text=st.booleans())
def test_model_spec_of_any_json_gives_a_model_or_a_clear_error(files, tmp_path, changes, as_text):
    folder, _ = files
    tensors, header = _header(folder / "model.safetensors")
    spec = {**header["spec"], **changes}
    header["spec"] = json.dumps(spec) if as_text else spec  # a spec given as a string is refused as one
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"gradleak": json.dumps(header)})
    result = _clear_error_or(load_model_state, path)
    if result is not None:
        assert result[1].image_size <= 4096


@FUZZ
@given(meta=JSON, junk=st.binary(max_size=64), where=st.sampled_from(["header", "legacy-pair", "junk-tensors"]))
def test_a_damaged_checkpoint_is_a_clear_error_on_resume(files, tmp_path_factory, meta, junk, where):
    """Any JSON as the checkpoint's JSON part (in the tensor file's header, or in checkpoint.json of a
    checkpoint written before the header held it), or junk as the tensor file: a clear error."""
    from gradleak.attacks.checkpoint import HEADER_KEY

    folder, server = files
    update = load_update(folder / "update.safetensors", model=server.model)
    run = tmp_path_factory.mktemp("run")
    cfg = {"iterations": 2, "channels": 4, "checkpoint_every": 1}
    gradleak.attacks.create("cinet", cfg).reconstruct(server, update, run_dir=run)
    tensors = load_file(str(Checkpointer(run, 0).tensor_path))
    if where == "header":
        save_file(tensors, str(Checkpointer(run, 0).tensor_path), metadata={HEADER_KEY: json.dumps(meta)})
    elif where == "legacy-pair":
        save_file(tensors, str(Checkpointer(run, 0).tensor_path))
        Checkpointer(run, 0).meta_path.write_text(json.dumps(meta))
    else:
        Checkpointer(run, 0).tensor_path.write_bytes(junk)
    with pytest.raises(GradleakError):
        gradleak.attacks.create("cinet", cfg).reconstruct(server, update, run_dir=run, resume=True)


def test_the_checkpoint_reader_refuses_a_pickle(tmp_path):
    import pickle

    Checkpointer(tmp_path, 0).tensor_path.write_bytes(pickle.dumps({"x": torch.zeros(1)}))
    Checkpointer(tmp_path, 0).meta_path.write_text(json.dumps({"iteration": 1}))
    with pytest.raises(GradleakError, match="unreadable"):
        Checkpointer(tmp_path, 1).load()
