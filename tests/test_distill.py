"""Knowledge distillation (run.py --teacher): it transfers the teacher's function, resumes exactly,
and refuses teachers it cannot use before any work starts."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import checkpoint
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
    logits = torch.randn(8, 7)
    hard = torch.nn.functional.cross_entropy(logits, torch.arange(8) % 7)
    same = torch.softmax(logits / 4, 1)
    assert torch.equal(train.distillation_loss(hard, logits, same, 0.0, 4.0), hard)
    assert train.distillation_loss(hard, logits, same, 1.0, 4.0).abs() < 1e-6
    other = torch.softmax(torch.randn(8, 7), 1)
    assert train.distillation_loss(hard, logits, other, 1.0, 4.0) > 0.01



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
    images, labels = dataset.load_fer2013(csv, log=lambda *a: None).split("train")
    assert saved["hold_out"] == [1, 3] and saved["hold_out_sha256"] == dataset.folds_sha256(images, labels, 3)
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert run.main(["--checkpoint", str(last), "--epoch_num", "2", "-o", str(tmp_path / "out")]) == 0
    assert f"training on {kept} of the 1600" in capsys.readouterr().out


def test_a_fold_that_takes_a_whole_class_away_is_refused():
    images, labels = np.zeros((6, 48, 48), np.uint8), np.array([0, 0, 0, 1, 1, 2])
    fold = int(dataset.fold_of(6, 2)[5])  # the fold of the only face of class 2
    args = run.get_args_parser().parse_args(["--hold_out", str(fold), "2"])
    with pytest.raises(UserError, match="leaves no training face of the class.es. Fear: use fewer folds"):
        run.hold_out({"train": (images, labels)}, args, ["Angry", "Disgust", "Fear"], print)


class Constant(torch.nn.Module):
    """A teacher that answers the same logits for every face, trained without fold `hold_out`."""
    def __init__(self, logits, hold_out=None, fingerprint=None):
        super().__init__()
        self.logits, self.hold_out, self.hold_out_sha256 = torch.tensor(logits), hold_out, fingerprint

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_each_face_gets_the_soft_targets_of_the_teachers_that_never_saw_it():
    split = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2), np.arange(10) % 3
    fingerprint = dataset.folds_sha256(*split, 2)
    first, second = Constant([3.0, 0, 0], [0, 2], fingerprint), Constant([0, 3.0, 0], [1, 2], fingerprint)
    everyone = Constant([0, 0, 3.0])
    fold = dataset.fold_of(10, 2)
    weights = run.teacher_weights([first, second], ["a", "b"], split, None)
    targets = train.teacher_probabilities([first, second], torch.zeros(10, 1, 4, 4), 1.0, weights)
    assert np.array_equal(targets.argmax(1).numpy(), fold)  # fold 0's faces: the first teacher's answer
    assert torch.allclose(targets[0], torch.softmax(torch.tensor([3.0, 0, 0] if fold[0] == 0 else [0, 3.0, 0]), 0))
    with torch.autocast("cpu", torch.bfloat16):  # as under --amp: the soft targets stay float32
        assert train.teacher_probabilities([first, second], torch.zeros(10, 1, 4, 4), 1.0, weights).dtype == torch.float32
    # A teacher trained on every face labels every face, with the one that held out its fold.
    weights = run.teacher_weights([first, everyone], ["a", "c"], split, None)
    assert torch.equal(weights.sum(1), torch.ones(10))
    assert torch.equal(weights[:, 0] > 0, torch.from_numpy(fold == 0)) and (weights[:, 1] > 0).all()
    assert run.teacher_weights([everyone], ["c"], split, None) is None  # no folds: the plain average
    with pytest.raises(UserError, match="training faces have no teacher: a teacher trained with --hold_out"):
        run.teacher_weights([first], ["a"], split, None)
    # A student that itself holds out fold 1 trains on fold 0 only: its teacher is enough.
    keep = np.flatnonzero(fold == 0)
    assert torch.equal(run.teacher_weights([first], ["a"], split, keep), torch.ones(len(keep), 1))
    relabelled = split[0], (split[1] + 1) % 3  # the same faces with other labels: other data
    with pytest.raises(UserError, match="held out fold 0 of 2 of other training faces"):
        run.teacher_weights([first, second], ["a", "b"], relabelled, None)


def test_a_student_distils_from_teachers_that_held_out_its_folds(faces, teacher, fold_teacher, tmp_path,
                                                                 capsys, monkeypatch):
    csv, _, _ = faces
    # The student holds out fold 0 of 3 and learns from the teachers of folds 1 and 2 (one exported).
    exported = checkpoint.export(fold_teacher(teacher, tmp_path / "fold2_train.pth", 2, 3, csv),
                                 str(tmp_path / "fold2.pth"))
    folds = [fold_teacher(teacher, tmp_path / "fold1.pth", 1, 3, csv), exported]
    served, used = [], []  # each batch's faces, and the teacher weights its soft targets used
    epoch, probabilities = dataset.Batches.epoch, train.teacher_probabilities
    monkeypatch.setattr(dataset.Batches, "epoch", lambda self, *a: (
        served.append(batch[1]) or batch for batch in epoch(self, *a)))
    monkeypatch.setattr(train, "teacher_probabilities", lambda t, x, temperature, weights=None: (
        used.append(weights), probabilities(t, x, temperature, weights))[1])
    assert run.main(run_args(csv, tmp_path, "--epoch_num", "1", "--hold_out", "0", "3", "--teacher", *folds)) == 0
    assert "fold1.pth (sha256 " in (out := capsys.readouterr().out)
    assert "held out fold 1 of 3, labels only those faces)" in out and "held out fold 2 of 3" in out
    kept_folds = torch.from_numpy(dataset.fold_of(1600, 3)[dataset.fold_of(1600, 3) != 0])
    assert len(used) == len(served) == 9  # 1,067 faces in batches of 128
    for faces_, weights in zip(served, used):  # each face: the teacher of its own fold, alone
        assert torch.equal(weights, torch.nn.functional.one_hot(kept_folds[faces_] - 1, 2).float())
    # One fold's teacher alone leaves the other fold without soft targets: refused up front.
    with pytest.raises(UserError, match="have no teacher"):
        run.main(run_args(csv, tmp_path / "one", "--epoch_num", "1", "--teacher", folds[0]))
    assert not (tmp_path / "one" / "ckpt").exists()


@pytest.mark.parametrize("flags, text", [(["--hold_out", "2", "2"], "needs 0 <= FOLD < FOLDS"),
                                         (["--hold_out", "0", "1"], "needs at least 2 FOLDS")])
def test_impossible_folds_are_refused(flags, text):
    with pytest.raises(UserError, match=text):
        run.resolve_run(run.get_args_parser(), flags)
