"""The fuzz suite (Hypothesis): hundreds of damaged recipes and checkpoint files, each of which must end
in the engine's own error (a :class:`KamalError` whose message is a sentence naming the file), or
be used correctly — never a traceback, never a hang.

* recipes: the quick demo's recipes with keys deleted, values of every wrong type and range, unknown
  keys and sections, other files where files are expected, and text-level damage (truncation, lost
  or doubled lines, stray characters); each is loaded and started (with a cancel already requested,
  so everything a run checks before its first training step is checked, and no training runs);
* checkpoints: the demo's teachers (a bundle, a foreign state_dict with a labels file, a
  ``.safetensors`` file) truncated, with bytes flipped, and with their tensors reshaped, retyped,
  removed, added or made non-finite; each is loaded as a recipe would load it.
"""

from __future__ import annotations

import collections
import itertools
import random
import re
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kamal_engine.errors import KamalError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from kamal_engine.events import CancelToken, RunCancelled
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe
from kamal_engine.teacher import load_teacher



def fuzz(examples: int) -> settings:
    """``examples`` cases, the same ones on every machine (derandomized, no example database); a case
    taking over 30 s fails as a hang."""
    return settings(max_examples=examples, deadline=timedelta(seconds=30), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
KEYS = {  # every key a section knows, so that mutations hit real keys most of the time
    "run": ["name", "output_dir", "device", "seed", "precision"],
    "teachers": ["checkpoint", "select", "name", "arch", "arch_kwargs", "labels_file", "labels", "task",
                 "input_size", "mean", "std", "trust"],
    "student": ["arch", "arch_kwargs", "init", "teacher", "checkpoint"],
    "data": ["mode", "unlabeled", "validation", "image_size", "max_damaged"],
    "method": ["id", "epochs_per_block", "finetune_epochs", "batch_size", "lr", "momentum", "weight_decay",
               "granularity", "filter", "generator_steps", "nz", "max_params", "branch_at", "epochs"],
    "export": ["onnx", "opset", "fp16"],
}
_counter = itertools.count()
REASONS: collections.Counter = collections.Counter()  # what refused the recipes (shown with pytest -s)


def sentence(error: KamalError) -> None:
    text = str(error)
    assert text and "Traceback" not in text and len(text) < 3000, text
    assert text[-1] not in ",:(", text


@pytest.fixture(scope="module")
def fuzz_root(quick_demo, tmp_path_factory):
    """The demo's recipes as dicts with absolute paths, the files a mutation may point at, and a scratch folder."""
    root, _ = quick_demo
    scratch = tmp_path_factory.mktemp("fuzz")
    bases = []
    for name in ("filtered-ka", "dual-gan"):  # the demo's own recipes (other tests add theirs beside them)
        text = (root / "recipes" / f"{name}.toml").read_text().replace('"../', f'"{root}/')
        data = tomllib.loads(text)
        del data["run"]["output_dir"]  # each case gets a fresh output folder (_write)
        data["method"]["batch_size"] = 16
        data.pop("export", None)
        bases.append(data)
    files = [str(p) for p in (root / "teachers").iterdir()] + [str(root / "data" / "validation" / "labels.csv"),
                                                                 str(root / "data" / "unlabeled"), str(root),
                                                                 str(root / "nope.pt"), "../x.pth", ""]
    for data in bases:  # unchanged, every recipe starts
        assert start(_write(scratch, tomllib.loads(tomli_w.dumps(data)))) == "started"
    return root, scratch, bases, files


def values(files):
    return st.one_of(
        st.integers(-(10**12), 10**12), st.integers(-3, 300),
        st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2),
        st.text(max_size=12), st.booleans(),
        st.sampled_from(LABELS + ["filtered-ka", "dual-gan", "dafl", "kd", "adaptive-ka", "cuda", "cuda:7", "cpu",
                                  "multiclass", "multilabel", "resnet18", "lenet5", "smallnet", "data", "data-free",
                                  "teacher", "random", "checkpoint", "unit", "block", "bf16"] + files),
        st.lists(st.one_of(st.sampled_from(LABELS), st.integers(-2, 2), st.text(max_size=6)), max_size=5),
        st.dictionaries(st.text(max_size=6), st.integers(-2, 64), max_size=2),
    )


def mutations(files):
    """(section, teacher index, key, value or None to delete) — one change to a recipe; the key is most
    often one the section knows, so that most changes get past the check for unknown keys."""
    def change(section):
        known = KEYS.get(section, ["x"])
        key = st.one_of(st.sampled_from(known), st.sampled_from(known), st.sampled_from(known), st.text(max_size=8))
        return st.tuples(st.just(section), st.integers(0, 2), key, st.one_of(st.none(), values(files)))
    return st.sampled_from(sorted(KEYS) * 4 + ["bogus"]).flatmap(change)


def apply(data: dict, changes) -> dict:
    data = tomllib.loads(tomli_w.dumps(data))  # a deep copy
    for section, index, key, value in changes:
        table = data.setdefault(section, {})
        if section == "teachers":
            if not table:
                data["teachers"] = table = [{}]
            table = table[index % len(table)]
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return data


def start(path: Path) -> str:
    """Load and start the recipe at ``path`` with a cancel already requested: "started" or "refused"."""
    token = CancelToken()
    token.cancel()
    try:
        run_recipe(load_recipe(path), cancel=token)
    except RunCancelled:
        return "started"
    except KamalError as exc:
        sentence(exc)
        REASONS[re.sub(r"/\S+", "…", str(exc))[:72]] += 1
        return "refused"
    raise AssertionError(f"{path} ran to the end although cancelled")


def _write(scratch: Path, data: dict | None, text: str | None = None) -> Path:
    folder = scratch / f"case-{next(_counter)}"
    folder.mkdir()
    if data is not None:
        data.setdefault("run", {})
        if isinstance(data["run"], dict) and "output_dir" not in data["run"]:
            data["run"]["output_dir"] = str(folder / "out")
        text = tomli_w.dumps(data)
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def outcomes():
    seen: dict[str, int] = {}
    yield seen
    print("fuzz outcomes:", seen, "\nmost common refusals:\n" + "\n".join(f"{n:4d} {text}" for text, n in
                                                                        REASONS.most_common(30)))
    # both kinds happen: the mutations are not all refused at the first line, nor all harmless
    assert seen.get("refused", 0) > 50 and seen.get("started", 0) > 5, seen


@fuzz(360)
@given(data=st.data())
def test_recipes_with_changed_keys_and_values(fuzz_root, outcomes, data):
    root, scratch, bases, files = fuzz_root
    base = bases[data.draw(st.integers(0, len(bases) - 1), label="recipe")]
    changes = data.draw(st.lists(mutations(files), min_size=1, max_size=3))
    mutated = apply(base, changes)
    try:
        path = _write(scratch, mutated)
    except (TypeError, ValueError):  # not expressible in TOML (tomli_w refuses): nothing to test
        return
    result = start(path)
    outcomes[result] = outcomes.get(result, 0) + 1


@fuzz(160)
@given(data=st.data())
def test_recipes_with_damaged_text(fuzz_root, outcomes, data):
    root, scratch, bases, files = fuzz_root
    base = dict(bases[data.draw(st.integers(0, len(bases) - 1), label="recipe")])
    base["run"] = {**base["run"], "output_dir": "out"}
    lines = tomli_w.dumps(base).splitlines(keepends=True)
    kind = data.draw(st.sampled_from(["truncate", "drop-line", "double-line", "insert", "replace"]))
    if kind == "drop-line":
        del lines[data.draw(st.integers(0, len(lines) - 1))]
    elif kind == "double-line":
        i = data.draw(st.integers(0, len(lines) - 1))
        lines.insert(i, lines[i])
    text = "".join(lines)
    if kind == "truncate":
        text = text[:data.draw(st.integers(0, len(text)))]
    elif kind in ("insert", "replace"):
        at = data.draw(st.integers(0, len(text)))
        stray = data.draw(st.text(min_size=1, max_size=4))
        text = text[:at] + stray + text[at + (len(stray) if kind == "replace" else 0):]
    result = start(_write(scratch, None, text))
    outcomes[result] = outcomes.get(result, 0) + 1


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_files(quick_demo, tmp_path_factory):
    """(file, how a recipe loads it, the original weights) for a bundle, a foreign state_dict, a .safetensors."""
    root, _ = quick_demo
    folder = tmp_path_factory.mktemp("fuzz-teachers")
    bundle = root / "teachers" / "digits_0to4.kamal.pt"
    foreign = root / "teachers" / "digits_5to9.pth"
    labels = {"labels_file": root / "teachers" / "digits_5to9.labels.txt", "task": "multilabel", "input_size": 56}
    safe = load_teacher(bundle).save(folder / "digits_0to4.safetensors")
    cases = []
    for path, kwargs in ((bundle, {}), (foreign, labels), (safe, {})):
        cases.append((path, kwargs, {k: v.clone() for k, v in load_teacher(path, **kwargs).model.state_dict().items()}))
    return folder, cases


def _tensor_mutation(state: dict, rng: random.Random, kind: str) -> object:
    keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    key = rng.choice(keys)
    value = state[key]
    if kind == "reshape":
        state[key] = value.reshape(-1)[: max(1, value.numel() // 2)] if value.numel() > 1 else torch.zeros(3)
    elif kind == "retype":
        state[key] = value.to(rng.choice([torch.int64, torch.bool, torch.float16, torch.complex64, torch.uint8]))
    elif kind == "remove":
        del state[key]
    elif kind == "add":
        state[f"extra.{rng.randrange(9)}.weight"] = torch.randn(rng.randrange(1, 5), 3)
    elif kind == "non-finite" and value.is_floating_point() and value.numel():
        value = value.clone()
        value.view(-1)[rng.randrange(value.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        state[key] = value
    elif kind == "not-a-tensor":
        state[key] = rng.choice(["weights", 3, None, [1, 2]])
    elif kind == "empty":
        state.clear()
    elif kind == "scalar":
        state[key] = torch.tensor(1.0)
    return state


def _usable(teacher, original: dict, exact: bool) -> None:
    """A teacher that loaded predicts finite probabilities; after byte damage its weights are the original."""
    if exact:
        state = teacher.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in original.items()), "damaged weights loaded silently"
    size = teacher.preprocessing.input_size
    out = teacher.predict(torch.randint(0, 255, (2, 3, *size), dtype=torch.uint8))
    assert out.shape[0] == 2 and bool(torch.isfinite(out).all())


@fuzz(220)
@given(data=st.data())
def test_damaged_checkpoint_files(teacher_files, data):
    folder, cases = teacher_files
    path, kwargs, original = cases[data.draw(st.integers(0, len(cases) - 1), label="file")]
    blob = path.read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip", "reshape", "retype", "remove", "add", "non-finite",
                                      "not-a-tensor", "empty", "scalar"]))
    target = folder / f"case-{next(_counter)}{path.suffix}"
    exact = kind in ("truncate", "flip")
    if kind == "truncate":
        target.write_bytes(blob[:data.draw(st.integers(0, len(blob) - 1))])
    elif kind == "flip":
        damaged = bytearray(blob)
        # a .safetensors file has no checksum: only damage to its header can be seen; a torch.save zip
        # carries a CRC-32 per part, so damage anywhere is
        end = 8 + int.from_bytes(blob[:8], "little") if path.suffix == ".safetensors" else len(blob)
        for offset in data.draw(st.lists(st.integers(0, end - 1), min_size=1, max_size=6)):
            damaged[offset] ^= 1 << data.draw(st.integers(0, 7))
        target.write_bytes(bytes(damaged))
    else:
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file, save_file

            state = _tensor_mutation(dict(load_file(str(path))), rng, kind)
            try:
                save_file(state, str(target))
            except Exception:  # noqa: BLE001 - safetensors cannot even write this mutation
                return
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            inner = saved["state_dict"] if "state_dict" in saved else saved
            mutated = _tensor_mutation(dict(inner), rng, kind)
            torch.save({**saved, "state_dict": mutated} if "state_dict" in saved else mutated, target)
    try:
        teacher = load_teacher(target, **kwargs)
    except KamalError as exc:
        sentence(exc)
        assert str(target) in str(exc)
        return
    _usable(teacher, original, exact)
