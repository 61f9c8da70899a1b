"""tools/choose_ensemble.py: every subset and TTA ranked on PublicTest with the same numbers
infer.py gives, PrivateTest never read, and clear errors for bad requests."""
import json
import os

import numpy as np
import pytest
import torch

import dataset
import synthetic
import utils
import predict
from tests.test_infer import random_model, run_cli, save_checkpoint
from tools import choose_ensemble

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    csv = synthetic.write_synthetic_csv(str(folder / "tiny.csv"), n_train=7, n_val=40, n_test=20, seed=4)
    always_happy = random_model(2)
    with torch.no_grad():
        always_happy.classifier[-1].weight.zero_()
        always_happy.classifier[-1].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]))
    paths = [save_checkpoint(folder / "a.pth", random_model(0)),
             save_checkpoint(folder / "b.pth", random_model(1)),
             save_checkpoint(folder / "happy.pth", always_happy)]
    return csv, paths


def choose(argv, capsys):
    return run_cli(argv, capsys, choose_ensemble.main)


def test_ranks_every_subset_and_tta_on_publictest_only(setup, tmp_path, monkeypatch, capsys):
    csv, paths = setup
    splits_read = []
    real_split = dataset.FerData.split
    monkeypatch.setattr(dataset.FerData, "split",
                        lambda self, name: splits_read.append(name) or real_split(self, name))
    out = tmp_path / "choice" / "ensemble.json"
    code, printed, _ = choose(["-c", *paths, "-d", csv, "--tta", "none", "flip", "-o", str(out),
                               "--no-amp"], capsys)
    assert code == 0, printed
    assert splits_read == ["val"]  # the choice never sees PrivateTest

    result = json.loads(out.read_text())
    ranking = result["ranking"]
    assert len(ranking) == 7 * 2  # 7 non-empty subsets of 3, two TTA modes
    assert sorted(ranking, key=lambda r: -r["accuracy"]) == ranking
    monkeypatch.setattr(dataset.FerData, "split", real_split)
    images, labels = dataset.load_fer2013(csv).split("val")
    for row in ranking:  # each figure is what infer.py computes for that ensemble
        probs = predict.predict(predict.load_models(row["members"]), images, row["tta"])
        assert row["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    happy_share = float(np.mean(labels == utils.EMOTIONS.index("Happy")))
    assert [r["accuracy"] for r in ranking if r["members"] == [paths[2]]] == pytest.approx([happy_share] * 2)

    pick = result["pick"]
    assert len(pick["members"]) >= 2
    assert pick == next(r for r in ranking if len(r["members"]) >= 2)
    assert result["privatetest_command"].endswith(f"--split test --tta {pick['tta']}")
    assert " ".join(pick["members"]) in result["privatetest_command"]
    assert f"{pick['accuracy']:.2%} on PublicTest" in printed


@pytest.mark.parametrize("argv, message", [
    (["--min_members", "4"], "--min_members must be 1 to 3"),
    (["--tta", "mirror"], "invalid choice"),
])
def test_bad_requests_exit_2_before_any_work(setup, tmp_path, capsys, argv, message):
    csv, paths = setup
    code, _, err = choose(["-c", *paths, "-d", csv, "-o", str(tmp_path / "x.json"), *argv], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "x.json").exists()


def test_the_same_checkpoint_twice_a_folder_and_other_classes_are_refused(setup, tmp_path, capsys):
    import checkpoint
    from models import FerNet
    csv, paths = setup
    again = os.path.join(os.path.dirname(paths[0]), ".", os.path.basename(paths[0]))
    code, _, err = choose(["-c", paths[0], again, "-d", csv, "-o", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "a checkpoint is given twice" in err
    code, _, err = choose(["-c", *paths, "-d", str(tmp_path), "-o", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "is a folder" in err
    names = ["Happy", "Sad", "contempt"]
    three = tmp_path / "three.pth"
    torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2", "class_names": names,
                "model_state": FerNet("vgg2_0_2", class_names=names).state_dict()}, three)
    code, _, err = choose(["-c", str(three), "-d", csv, "--min_members", "1", "-o", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "need a model of FER2013's seven classes" in err
    assert not (tmp_path / "x.json").exists()


def test_bad_rows_are_dropped_when_asked(setup, tmp_path, capsys):
    csv, paths = setup
    broken = tmp_path / "broken.csv"
    broken.write_text(open(csv).read() + "3,1 2 3,PublicTest\n")
    code, _, err = choose(["-c", *paths[:2], "-d", str(broken), "-o", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "--skip" in err
    code, _, err = choose(["-c", *paths[:2], "-d", str(broken), "--skip_bad_rows", "-o", str(tmp_path / "x.json")],
                          capsys)
    assert code == 0 and json.loads((tmp_path / "x.json").read_text())["faces"] == 40, err


def test_a_missing_checkpoint_is_a_clear_error(setup, tmp_path, capsys):
    csv, paths = setup
    code, _, err = choose(["-c", paths[0], str(tmp_path / "nope.pth"), "-d", csv,
                           "-o", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "nope.pth" in err and "Traceback" not in err
