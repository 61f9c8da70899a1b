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
import train
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


def fold_teacher(source, destination, fold, folds, faces):
    """A copy of the checkpoint `source` that says it was trained without fold `fold` of `folds`
    of a training split of `faces` faces (what run.py --hold_out writes into its args)."""
    ckpt = torch.load(source, weights_only=True)
    ckpt["args"] = dict(ckpt.get("args", {}), hold_out=[fold, folds], hold_out_faces=faces)
    torch.save(ckpt, destination)
    return str(destination)


def test_folds_are_fixed_balanced_and_cover_every_face():
    folds = dataset.fold_of(1001, 3)
    assert np.array_equal(folds, dataset.fold_of(1001, 3))  # no seed: every run draws the same
    assert sorted(np.bincount(folds).tolist()) == [333, 334, 334]
    assert not np.array_equal(folds, np.arange(1001) % 3)  # shuffled, not every third face


def test_hold_out_trains_without_its_fold_and_keeps_it_on_resume(faces, tmp_path, capsys):
    csv, _, _ = faces
    kept = int((dataset.fold_of(1600, 3) != 1).sum())
    assert run.main(run_args(csv, tmp_path, "--epoch_num", "1", "--hold_out", "1", "3")) == 0
    out = capsys.readouterr().out
    assert f"holding out fold 1 of 3: training on {kept} of the 1600 training faces" in out
    assert f"{kept} training, 400 validation faces" in out
    saved = json.loads((tmp_path / "out" / "r" / "args.json").read_text())
    assert saved["hold_out"] == [1, 3] and saved["hold_out_faces"] == 1600
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert run.main(["--checkpoint", str(last), "--epoch_num", "2", "-o", str(tmp_path / "out")]) == 0
    assert f"training on {kept} of the 1600" in capsys.readouterr().out


def test_each_face_gets_the_soft_targets_of_the_teachers_that_never_saw_it(faces, teacher, tmp_path):
    class Constant(torch.nn.Module):  # a teacher that answers the same logits for every face
        def __init__(self, logits, hold_out):
            super().__init__()
            self.logits, self.hold_out, self.hold_out_faces = torch.tensor(logits), hold_out, 10

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    first, second = Constant([3.0, 0, 0], [0, 2]), Constant([0, 3.0, 0], [1, 2])
    everyone = Constant([0, 0, 3.0], None)
    fold = dataset.fold_of(10, 2)
    weights = run.teacher_weights([first, second], ["a", "b"], 10, None)
    targets = train.teacher_probabilities([first, second], torch.zeros(10, 1, 4, 4), 1.0, weights)
    assert np.array_equal(targets.argmax(1).numpy(), fold)  # fold 0's faces: the first teacher's answer
    assert torch.allclose(targets[0], torch.softmax(torch.tensor([3.0, 0, 0] if fold[0] == 0 else [0, 3.0, 0]), 0))
    # A teacher trained on every face labels every face, with the one that held out its fold.
    weights = run.teacher_weights([first, everyone], ["a", "c"], 10, None)
    assert torch.equal(weights.sum(1), torch.ones(10))
    assert torch.equal(weights[:, 0] > 0, torch.from_numpy(fold == 0)) and (weights[:, 1] > 0).all()
    keep = np.array([1, 4, 7])  # a student that itself holds out faces: rows of the faces it trains on
    assert torch.equal(run.teacher_weights([first, second], ["a", "b"], 10, keep), run.teacher_weights(
        [first, second], ["a", "b"], 10, None)[keep])
    assert run.teacher_weights([everyone], ["c"], 10, None) is None  # no folds: the plain average
    with pytest.raises(UserError, match="training faces have no teacher: a teacher trained with --hold_out"):
        run.teacher_weights([first], ["a"], 10, None)
    with pytest.raises(UserError, match="a training split of 10 faces, and this one has 12"):
        run.teacher_weights([first, second], ["a", "b"], 12, None)


def test_a_student_distils_from_teachers_that_held_out_its_folds(faces, teacher, tmp_path, capsys, monkeypatch):
    csv, _, _ = faces
    folds = [fold_teacher(teacher, tmp_path / f"fold{i}.pth", i, 2, 1600) for i in (0, 1)]
    served, used = [], []  # each batch's faces, and the teacher weights its soft targets used
    epoch, probabilities = dataset.Batches.epoch, train.teacher_probabilities
    monkeypatch.setattr(dataset.Batches, "epoch", lambda self, *a: (
        served.append(batch[1]) or batch for batch in epoch(self, *a)))
    monkeypatch.setattr(train, "teacher_probabilities", lambda t, x, temperature, weights=None: (
        used.append(weights), probabilities(t, x, temperature, weights))[1])
    assert run.main(run_args(csv, tmp_path, "--epoch_num", "1", "--teacher", *folds)) == 0
    fold_of_face = torch.from_numpy(dataset.fold_of(1600, 2))
    assert len(used) == len(served) == 13  # 1,600 faces in batches of 128
    for faces_, weights in zip(served, used):  # each face: the teacher of its own fold, alone
        assert torch.equal(weights, torch.nn.functional.one_hot(fold_of_face[faces_], 2).float())
    assert "fold0.pth (sha256 " in (out := capsys.readouterr().out)
    assert "held out fold 0 of 2, labels only those faces)" in out and "held out fold 1 of 2" in out
    # One fold's teacher alone leaves the other fold without soft targets: refused up front.
    with pytest.raises(UserError, match="have no teacher"):
        run.main(run_args(csv, tmp_path / "one", "--epoch_num", "1", "--teacher", folds[0]))
    assert not (tmp_path / "one" / "ckpt").exists()


@pytest.mark.parametrize("flags, text", [(["--hold_out", "2", "2"], "needs 0 <= FOLD < FOLDS"),
                                         (["--hold_out", "0", "1"], "needs at least 2 FOLDS")])
def test_impossible_folds_are_refused(flags, text):
    with pytest.raises(UserError, match=text):
        run.resolve_run(run.get_args_parser(), flags)
