"""tools/runs_chart.py: a run's checkpoint gives its history JSON and a line; committed history
JSONs redraw the chart unchanged; each run is named in the legend; a file without a history is refused before anything is written."""
import json

import pytest

import run
import synthetic
from tools import runs_chart
from utils import run_cli


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chart")
    csv = synthetic.write_synthetic_csv(str(folder / "tiny.csv"), n_train=128, n_val=32, n_test=8, seed=5)
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before conftest's private_cache
        mp.setenv("FER_CACHE_DIR", str(folder / "cache"))
        assert run.main(["-d", csv, "-m", "vgg2_0_2", "--epoch_num", "1", "--batch_size", "32",
                         "--num_iter_to_validate", "2", "--pretrained", "no", "--num_save", "0",
                         "--run_name", "r", "--checkpoint_dir", str(folder / "ckpt"),
                         "-o", str(folder / "out")]) == 0
    return folder / "ckpt" / "r"


def test_checkpoint_and_history_json_make_one_chart(finished_run, tmp_path):
    chart = tmp_path / "results" / "chart.png"
    assert runs_chart.main([str(finished_run), "-o", str(chart)]) == 0
    written = json.loads((tmp_path / "results" / "r_history.json").read_text())
    assert written["model"] == "vgg2_0_2" and written["epochs_planned"] == 1
    assert [h["step"] for h in written["history"]] == [2, 4]
    assert all("val_acc_raw" in h for h in written["history"])  # the weight average was on
    assert written["best_publictest_acc"] == max(h["val_acc"] for h in written["history"])
    assert chart.stat().st_size > 0

    # Redrawn from the committed JSON alone: the JSON is read, not rewritten.
    before = (tmp_path / "results" / "r_history.json").read_bytes()
    chart.unlink()
    assert runs_chart.main([str(tmp_path / "results" / "r_history.json"), "-o", str(chart)]) == 0
    assert chart.exists() and (tmp_path / "results" / "r_history.json").read_bytes() == before


def test_a_json_without_history_is_refused_before_writing(finished_run, tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"rows": [1, 2]}))
    chart = tmp_path / "out" / "chart.png"
    with pytest.raises(SystemExit) as exit_:
        run_cli(runs_chart.main, [str(finished_run), str(bad), "-o", str(chart)])
    assert exit_.value.code == 2
    assert "holds no validation history" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # not even the run's history JSON


def test_runs_of_one_model_get_their_own_legend_entries():
    control = {"run_name": "conv5_e30", "model": "vgg2_4_2_conv5", "epochs_planned": 30, "seed": 1}
    distilled = dict(control, run_name="conv5_kd_a05_e30", teachers=["a.pth", "b.pth"])
    assert runs_chart.run_label(control) == "conv5_e30 (vgg2_4_2_conv5, 30 epochs planned, seed 1)"
    assert runs_chart.run_label(distilled) == ("conv5_kd_a05_e30 (vgg2_4_2_conv5, 30 epochs planned, "
                                               "seed 1, distilled from 2)")
    assert runs_chart.run_label({"model": "vgg2_0_2", "epochs_planned": 6}) == "vgg2_0_2 (6 epochs planned)"
