import pytest

from kamal_engine.recipe import RecipeError, load_recipe, parse_recipe


def test_demo_recipes_load(quick_demo):
    root, _ = quick_demo
    recipe = load_recipe(root / "recipes" / "filtered-ka.toml")
    assert recipe.method == "filtered-ka" and recipe.mode == "data" and recipe.name == "demo-filtered-ka"
    assert recipe.unlabeled == (root / "data" / "unlabeled").resolve()
    assert recipe.output_dir == (root / "runs" / "filtered-ka").resolve()
    assert [t.select for t in recipe.teachers] == [["zero", "one", "two", "three", "four"],
                                                  ["five", "six", "seven", "eight", "nine"]]
    teachers = [t.load() for t in recipe.teachers]
    assert teachers[1].task == "multilabel" and teachers[1].preprocessing.input_size == (56, 56)
    free = load_recipe(root / "recipes" / "dual-gan.toml")
    assert free.mode == "data-free" and free.unlabeled is None and free.student_init == "teacher"


def test_written_recipe_reads_back_the_same(quick_demo, tmp_path):
    root, _ = quick_demo
    recipe = load_recipe(root / "recipes" / "filtered-ka.toml")
    (tmp_path / "again.toml").write_text(recipe.to_toml())
    again = load_recipe(tmp_path / "again.toml")
    for field in ("name", "output_dir", "device", "seed", "mode", "unlabeled", "validation", "method", "opset"):
        assert getattr(again, field) == getattr(recipe, field)
    assert [(t.checkpoint, t.select, t.task) for t in again.teachers] == [
        (t.checkpoint, t.select, t.task) for t in recipe.teachers]


BASE = """\
[run]
name = "x"

[[teachers]]
checkpoint = "{ckpt}"

[data]
mode = "data-free"
"""


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "t.pt"
    path.write_bytes(b"PK")
    return path


def test_unknown_key_names_key_and_line(ckpt, tmp_path):
    text = BASE.format(ckpt=ckpt) + "\n[method]\nid = \"kd\"\n\n[export]\nopset = 18\nonxx = \"a.onnx\"\n"
    with pytest.raises(RecipeError, match=r"r\.toml, line 15: \[export\]\.onxx: unknown key"):
        parse_recipe(text, tmp_path / "r.toml")


def test_unknown_teacher_key_in_second_teacher(ckpt, tmp_path):
    text = BASE.format(ckpt=ckpt) + f'\n[[teachers]]\ncheckpoint = "{ckpt}"\nselct = ["a"]\n'
    with pytest.raises(RecipeError, match=r"line 12: \[teachers\]\.selct: unknown key"):
        parse_recipe(text, tmp_path / "r.toml")


def test_missing_file_is_named(tmp_path):
    text = BASE.format(ckpt="teachers/missing.pt")
    with pytest.raises(RecipeError, match=r"line 5: \[teachers\]\.checkpoint: .*teachers/missing\.pt not found"):
        parse_recipe(text, tmp_path / "r.toml")


@pytest.mark.parametrize("extra,message", [
    ('\n[run]\n', "not valid TOML"),
    ('\n[student]\ninit = "pretrained"\n', r"\[student\]\.init: expected teacher or random or checkpoint"),
    ('\n[student]\ninit = "checkpoint"\n', r"line 11: \[student\]\.init: init = \"checkpoint\" needs 'checkpoint'"),
    ('\n[student]\ncheckpoint = "t.pt"\n', r"\[student\]\.checkpoint: a weights file is only read with init"),
    ('\n[student]\ninit = "checkpoint"\ncheckpoint = "nowhere.pth"\n', r"line 12: \[student\]\.checkpoint: .*nowhere\.pth not found"),
    ('\n[student]\nteacher = 3\n', r"\[student\]\.teacher: expected a teacher number from 1 to 1"),
    ('\n[export]\nopset = "18"\n', r"\[export\]\.opset: expected an ONNX opset"),
    ('\n[training]\nx = 1\n', r"\[training\]: unknown section"),
])
def test_bad_values(ckpt, tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(BASE.format(ckpt=ckpt) + extra, tmp_path / "r.toml")


def test_student_checkpoint_is_resolved_and_written_back(ckpt, tmp_path):
    text = BASE.format(ckpt=ckpt) + '\n[student]\ninit = "checkpoint"\ncheckpoint = "t.pt"\n'
    recipe = parse_recipe(text, tmp_path / "r.toml")
    assert recipe.student_init == "checkpoint" and recipe.student_checkpoint == ckpt.resolve()
    (tmp_path / "again.toml").write_text(recipe.to_toml())
    assert load_recipe(tmp_path / "again.toml").student_checkpoint == ckpt.resolve()


def test_data_mode_needs_a_folder(ckpt, tmp_path):
    text = BASE.format(ckpt=ckpt).replace('mode = "data-free"', 'mode = "data"')
    with pytest.raises(RecipeError, match=r"line 8: \[data\]\.mode: data mode needs 'unlabeled'"):
        parse_recipe(text, tmp_path / "r.toml")
    text = text.replace('mode = "data"', f'mode = "data"\nunlabeled = "{tmp_path / "nowhere"}"')
    with pytest.raises(RecipeError, match=r"line 9: \[data\]\.unlabeled: .*nowhere not found"):
        parse_recipe(text, tmp_path / "r.toml")


def test_the_onnx_path_follows_a_changed_output_folder_unless_the_user_put_it_elsewhere(tmp_path):
    from kamal_engine.recipe import follow_output_dir

    old, new = tmp_path / "runs" / "filtered-ka", tmp_path / "runs" / "mine"
    assert follow_output_dir(old / "student.onnx", old, new) == new / "student.onnx"
    assert follow_output_dir(old / "onnx" / "s.onnx", old, new) == new / "onnx" / "s.onnx"
    assert follow_output_dir(tmp_path / "exports" / "s.onnx", old, new) == tmp_path / "exports" / "s.onnx"
    assert follow_output_dir(None, old, new) is None and follow_output_dir(old / "s.onnx", None, new) == old / "s.onnx"
