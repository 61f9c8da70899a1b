"""Knowledge distillation (run.py --teacher): it transfers the teacher's function, resumes exactly,
and refuses teachers it cannot use before any work starts."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import dataset
import run
import synthetic
import predict
from utils import UserError, file_sha256


def run_args(csv, root, *extra):
    return ["-d", csv, "--checkpoint_dir", str(root / "ckpt"), "-o", str(root / "out"),
            "--pretrained", "no", "--num_save", "0", "--run_name", "r", "-m", "vgg2_0_2", *extra]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Synthetic faces, and a copy whose Training labels are shuffled: a student trained on those
    labels alone learns nothing that generalises, so what it agrees with the teacher on comes
    from the teacher."""
    folder = tmp_path_factory.mktemp("kd")
    csv = synthetic.write_synthetic_csv(str(folder / "faces.csv"), n_train=1600, n_val=400,
                                        n_test=400, seed=4)
    table = pd.read_csv(csv)
    train = table["Usage"] == "Training"
    table.loc[train, "emotion"] = np.random.default_rng(0).permutation(table.loc[train, "emotion"].values)
    shuffled = str(folder / "shuffled.csv")
    table.to_csv(shuffled, index=False)
    return csv, shuffled, folder


@pytest.fixture(scope="module")
def teacher(faces):
    """A vgg2_0_2 trained on the true labels (the synthetic demo's settings)."""
    csv, _, folder = faces
    root = folder / "teacher"
    assert run.main(run_args(csv, root, "--epoch_num", "6", "--batch_size", "64", "--optimizer",
                             "adamw", "--erase_p", "0")) == 0
    return str(root / "ckpt" / "r" / "vgg2_0_2_best.pth")


def predicted_classes(ckpt_path, images):
    return predict.predict(predict.load_models(str(ckpt_path)), images).argmax(1)


def test_a_distilled_student_agrees_with_its_teacher_more_than_one_trained_without(faces, teacher, tmp_path):
    _, shuffled, _ = faces
    data = dataset.load_fer2013(shuffled, log=lambda *a: None)
    test_x, _ = data.split("test")
    common = ["--epoch_num", "3", "--batch_size", "64", "--optimizer", "adamw", "--erase_p", "0"]
    agreement = {}
    for name, extra in (("alone", []), ("distilled", ["--teacher", teacher])):
        root = tmp_path / name
        assert run.main(run_args(shuffled, root, *common, *extra)) == 0
        student = root / "ckpt" / "r" / "vgg2_0_2_last.pth"
        agreement[name] = float((predicted_classes(student, test_x) == predicted_classes(teacher, test_x)).mean())
    assert agreement["distilled"] > 0.6 and agreement["distilled"] > agreement["alone"] + 0.25, agreement


def test_the_teachers_and_their_sha256_are_stored_and_resuming_checks_them(faces, teacher, tmp_path, capsys):
    csv, _, _ = faces
    copy = tmp_path / "teacher.pth"
    copy.write_bytes(open(teacher, "rb").read())
    assert run.main(run_args(csv, tmp_path, "--epoch_num", "1", "--teacher", str(copy))) == 0
    saved = json.loads((tmp_path / "out" / "r" / "args.json").read_text())
    assert saved["teacher"] == [str(copy)] and saved["teacher_sha256"] == [file_sha256(teacher)]
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert torch.load(last, weights_only=True)["args"]["teacher_sha256"] == [file_sha256(teacher)]
    assert "distilling from 1 teacher(s) (alpha 0.9, temperature 4)" in capsys.readouterr().out

    resume = ["--checkpoint", str(last), "--epoch_num", "2", "-o", str(tmp_path / "out")]
    changed = torch.load(teacher, weights_only=True)
    changed["ema_state"] = {k: v + 1 if v.is_floating_point() else v for k, v in changed["ema_state"].items()}
    torch.save(changed, copy)
    with pytest.raises(UserError, match="has changed since the run started"):
        run.main(resume)
    copy.unlink()
    with pytest.raises(UserError, match="of this run is missing: put it back, or name where it is now"):
        run.main(resume)
    # The same file at another path, named on resume, is accepted (checked by its sha256).
    assert run.main(resume + ["--teacher", teacher]) == 0
    assert len(json.loads((tmp_path / "out" / "r" / "history.json").read_text())) == 2


@pytest.mark.parametrize("fault, message", [("broken", "is damaged or is not a PyTorch file"),
                                            ("classes", "names its classes"),
                                            ("missing", "no checkpoint file at")])
def test_a_teacher_that_cannot_be_used_is_refused_before_any_work(faces, teacher, tmp_path, fault, message):
    csv, _, _ = faces
    bad = tmp_path / "bad.pth"
    if fault == "broken":
        bad.write_bytes(open(teacher, "rb").read()[:5000])
    elif fault == "classes":
        ckpt = torch.load(teacher, weights_only=True)
        ckpt["class_names"] = ["a", "b", "c"]
        torch.save(ckpt, bad)
    with pytest.raises(UserError, match=message):
        run.main(run_args(csv, tmp_path, "--epoch_num", "1", "--teacher", teacher, str(bad)))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, text", [(["--kd_alpha", "1.5"], "--kd_alpha must be in [0, 1]"),
                                         (["--kd_temperature", "0"], "--kd_temperature must be positive")])
def test_impossible_distillation_settings_are_refused(flags, text):
    with pytest.raises(UserError, match=text.replace("[", r"\[").replace("]", r"\]")):
        run.resolve_run(run.get_args_parser(), flags)


def test_the_distillation_loss_is_the_usual_one_at_alpha_0_and_zero_when_the_student_matches():
    import train
    logits = torch.randn(8, 7)
    hard = torch.nn.functional.cross_entropy(logits, torch.arange(8) % 7)
    same = torch.softmax(logits / 4, 1)
    assert torch.equal(train.distillation_loss(hard, logits, same, 0.0, 4.0), hard)
    assert train.distillation_loss(hard, logits, same, 1.0, 4.0).abs() < 1e-6
    other = torch.softmax(torch.randn(8, 7), 1)
    assert train.distillation_loss(hard, logits, other, 1.0, 4.0) > 0.01
