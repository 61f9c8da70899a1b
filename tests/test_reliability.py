"""Faults during training: kills, Ctrl-C, NaN, unwritable folders, untrusted checkpoint files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import run
import synthetic
import checkpoint
import train
from utils import UserError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return synthetic.write_synthetic_csv(str(folder / "tiny.csv"), n_train=256, n_val=64,
                                         n_test=64, seed=4)


def start_training(csv, tmp_path, epochs):
    command = [sys.executable, "run.py", "-d", csv, "-m", "vgg2_0_2", "--epoch_num", str(epochs),
               "--batch_size", "32", "--num_iter_to_validate", "4", "--pretrained", "no",
               "--checkpoint_dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"),
               "--run_name", "r", "--num_save", "0"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, FER_CACHE_DIR=str(tmp_path / "cache")))


def wait_for(path, process, timeout=120):
    end = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()
        assert time.time() < end, "no checkpoint appeared"
        time.sleep(0.2)


def test_sigkill_after_the_first_checkpoint_then_resume_finishes(tiny_csv, tmp_path):
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    process = start_training(tiny_csv, tmp_path, epochs=3)
    wait_for(last, process)
    process.kill()  # SIGKILL: no chance to save anything
    process.communicate()
    saved = torch.load(last, weights_only=True)["train_state"]  # the file on disk is whole
    assert saved["step"] % 4 == 0 and saved["step"] < 24
    assert (last.parent / ".lock").exists()  # the killed run's lock: stale, taken over on resume
    assert run.main(["--checkpoint", str(last), "-o", str(tmp_path / "out")]) == 0
    done = torch.load(last, weights_only=True)["train_state"]
    assert done["step"] == 24  # 8 steps per epoch, 3 epochs
    assert len(done["history"]) == 6
    assert not (last.parent / ".lock").exists()


def test_sigint_saves_a_resumable_checkpoint_and_says_how_to_resume(tiny_csv, tmp_path):
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    process = start_training(tiny_csv, tmp_path, epochs=50)
    wait_for(last, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "stopped by SIGINT" in out and f"--checkpoint {last}" in out
    assert "Traceback" not in err
    saved = torch.load(last, weights_only=True)["train_state"]
    assert 4 <= saved["step"] < 40
    # Resume, shortening the run to 5 epochs (8 steps each) so the test ends soon.
    assert run.main(["--checkpoint", str(last), "--epoch_num", "5", "-o", str(tmp_path / "out")]) == 0
    resumed = torch.load(last, weights_only=True)["train_state"]
    assert resumed["step"] == 40 and resumed["history"][0] == saved["history"][0]


def test_a_diverging_loss_stops_with_a_clear_message(tiny_csv, tmp_path, capsys):
    argv = ["-d", tiny_csv, "-m", "vgg2_0_2", "--epoch_num", "3", "--batch_size", "32",
            "--lr", "1e8", "--scheduler", "none", "--pretrained", "no", "--num_iter_to_validate", "4",
            "--checkpoint_dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), "--run_name", "r"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(run.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "loss became nan" in err.lower() or "loss became inf" in err.lower()
    assert "learning rate 1e+08" in err and "Traceback" not in err
    # It diverged before the first save: there are no good checkpoints to speak of.
    assert "kept" not in err and "no checkpoint was saved" in err
    assert not (tmp_path / "ckpt" / "r").exists()


def test_unwritable_output_folder_fails_before_training(tiny_csv, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["-d", tiny_csv, "-m", "vgg2_0_2", "--pretrained", "no", "-o", str(blocker / "out"),
            "--checkpoint_dir", str(tmp_path / "ckpt")]
    with pytest.raises(SystemExit) as exit_:
        run_cli(run.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write to" in err and "Traceback" not in err


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(run.main, ["-d", str(tmp_path / "missing.csv"), "--debug"])
    assert "Traceback" in capsys.readouterr().err


class Exploit:
    """A pickle that would create a file when unpickled by a trusting loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2",
                "model_state": {}, "payload": Exploit(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(UserError) as refused:
        checkpoint.load(str(path))
    assert not marker.exists()
    message = str(refused.value)
    assert message.endswith("contains code or Python objects that this tool will not load "
                            "(it reads only tensors and plain values).")
    assert "weights_only" not in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("version, hint", [(0, "an older version's file"), (99, "newer version")])
def test_old_or_future_checkpoint_format_is_named(tmp_path, version, hint):
    path = tmp_path / "old.pth"
    torch.save({"format_version": version, "model_name": "vgg2_0_2", "model_state": {}}, path)
    with pytest.raises(UserError, match=hint):
        checkpoint.load(str(path))


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a zip or pickle"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is damaged or is not a PyTorch file"):
        checkpoint.load(str(path))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2",
                "model_state": {"w": torch.zeros(10000)}}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="is damaged or is not a PyTorch file"):
        checkpoint.load(str(path))


@pytest.mark.parametrize("failure", ["torch.save", "OSError"])
def test_disk_full_mid_run_keeps_the_best_checkpoint(tiny_csv, tmp_path, monkeypatch, capsys, failure):
    """The third checkpoint write fails as on a full disk (torch.save raises RuntimeError there,
    plain writes OSError 28): the error names the folder and says it is full; earlier files intact."""
    import shutil
    real_save = torch.save
    calls = []

    def fills_up(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:
            f.write(b"partial")
            if failure == "OSError":
                raise OSError(28, "No space left on device")
            monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", fills_up)
    argv = ["-d", tiny_csv, "-m", "vgg2_0_2", "--epoch_num", "3", "--batch_size", "32",
            "--pretrained", "no", "--num_iter_to_validate", "4", "--run_name", "r",
            "--checkpoint_dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        run_cli(run.main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    folder = tmp_path / "ckpt" / "r"
    assert f"the folder {folder} is full" in err and "intact" in err and "Traceback" not in err
    best = checkpoint.load(str(folder / "vgg2_0_2_best.pth"))
    assert best["train_state"]["step"] == 4  # written by the first validation, still whole
    assert not list(folder.glob(".tmp-*"))
    assert sorted(os.listdir(tmp_path / "ckpt" / "r")) == ["vgg2_0_2_best.pth", "vgg2_0_2_last.pth"]


# ----------------------------------------------------------------------------- run folders

def quick_run(csv, tmp_path, *extra):
    return ["-d", csv, "-m", "vgg2_0_2", "--epoch_num", "1", "--batch_size", "64",
            "--pretrained", "no", "--num_save", "0", "--run_name", "r",
            "--checkpoint_dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), *extra]


def exit_code_and_err(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(run.main, argv)
    return exit_.value.code, capsys.readouterr().err


def test_a_run_folder_in_use_is_refused(tiny_csv, tmp_path, capsys):
    import fcntl
    folder = tmp_path / "ckpt" / "r"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as owner:  # a live process holds it
        owner.write(f"{os.getpid()}\n")
        owner.flush()
        fcntl.flock(owner, fcntl.LOCK_EX)
        code, err = exit_code_and_err(quick_run(tiny_csv, tmp_path), capsys)
    assert code == 2 and f"another run (process {os.getpid()}) is using {folder}" in err
    assert not list(folder.glob("*.pth")) and (folder / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_new_run_never_replaces_an_earlier_runs_checkpoints(tiny_csv, tmp_path, capsys):
    assert run.main(quick_run(tiny_csv, tmp_path)) == 0
    best = tmp_path / "ckpt" / "r" / "vgg2_0_2_best.pth"
    before = best.read_bytes()
    code, err = exit_code_and_err(quick_run(tiny_csv, tmp_path), capsys)
    assert code == 2 and "already holds a run" in err
    assert f"python3 run.py --checkpoint {tmp_path / 'ckpt' / 'r' / 'vgg2_0_2_last.pth'}" in err
    assert best.read_bytes() == before


def test_outputs_follow_the_umask(tiny_csv, tmp_path):
    old = os.umask(0o022)
    try:
        assert run.main(quick_run(tiny_csv, tmp_path)) == 0
    finally:
        os.umask(old)
    for path in [tmp_path / "ckpt/r/vgg2_0_2_best.pth", tmp_path / "out/r/args.json",
                 tmp_path / "out/r/test/metrics.json", tmp_path / "out/r/curves.png"]:
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_resume_writes_where_the_command_says_never_where_the_file_says(tiny_csv, tmp_path):
    assert run.main(quick_run(tiny_csv, tmp_path, "--epoch_num", "2")) == 0
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    ckpt = torch.load(last, weights_only=True)
    ckpt["out_dir"] = str(tmp_path / "elsewhere")  # a hostile or stale path inside the file
    ckpt["train_state"]["step"] = 4  # resume into the second epoch
    torch.save(ckpt, last)
    (last.parent / ".tmp-stale-vgg2_0_2_last.pth").write_bytes(b"left by a killed save")
    assert run.main(["--checkpoint", str(last.parent), "-o", str(tmp_path / "new_out")]) == 0
    assert not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "new_out" / "r" / "history.json").exists()
    assert not list(last.parent.glob(".tmp-*"))  # stale temporary files of dead processes removed
    # A run name that is a path would put the outputs outside -o: refused.
    ckpt = torch.load(last, weights_only=True)
    ckpt["run_name"] = os.path.join("..", "..", "escaped")
    torch.save(ckpt, last)
    with pytest.raises(UserError, match="not a plain folder name"):
        run.main(["--checkpoint", str(last), "-o", str(tmp_path / "new_out" / "deeper")])
    assert not list(tmp_path.rglob("escaped"))


def test_a_resume_from_another_folder_writes_its_own_outputs_and_reads_the_moved_data(
        tiny_csv, tmp_path, monkeypatch):
    """Started with a relative -d and -o; resumed from another folder after the data moved: -d
    names the moved file, and without -o the outputs go to this command's ./outputs/<run>."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    shutil.copy(tiny_csv, start / "faces.csv")
    monkeypatch.chdir(start)
    assert run.main(["-d", "faces.csv", "-m", "vgg2_0_2", "--epoch_num", "1", "--batch_size", "64",
                     "--pretrained", "no", "--num_save", "0", "--run_name", "r",
                     "--checkpoint_dir", str(tmp_path / "ckpt"), "-o", "first_out"]) == 0
    shutil.move(start / "faces.csv", elsewhere / "moved.csv")
    monkeypatch.chdir(elsewhere)
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert run.main(["--checkpoint", str(last), "-d", "moved.csv", "--epoch_num", "2"]) == 0
    assert len(json.loads((elsewhere / "outputs" / "r" / "history.json").read_text())) == 2
    assert not (elsewhere / "first_out").exists()
    # Other data under -d is refused: the faces per split and class differ.
    other = synthetic.write_synthetic_csv(str(elsewhere / "other.csv"), n_train=320, n_val=64,
                                          n_test=64, seed=5)
    with pytest.raises(UserError, match="not the data set this run was trained on"):
        run.main(["--checkpoint", str(last), "-d", other, "--epoch_num", "3"])


def test_resuming_with_another_number_of_processes_is_refused(tiny_csv, tmp_path):
    assert run.main(quick_run(tiny_csv, tmp_path)) == 0
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    ckpt = torch.load(last, weights_only=True)
    ckpt["world_size"] = 8  # as torchrun --nproc_per_node 8 saves it
    torch.save(ckpt, last)
    with pytest.raises(UserError, match="trained by 8 process.*resume it with as many"):
        run.main(["--checkpoint", str(last), "--epoch_num", "2"])


def test_resuming_an_inference_only_export_shows_the_fine_tuning_command(tiny_csv, tmp_path, capsys):
    import checkpoint
    assert run.main(quick_run(tiny_csv, tmp_path)) == 0
    small = checkpoint.export(tmp_path / "ckpt/r/vgg2_0_2_best.pth", tmp_path / "small.pth")
    exported = torch.load(small, weights_only=True)
    assert exported["dataset"] == os.path.basename(tiny_csv)  # file names only, no machine paths
    assert exported["args"]["output"] == "out" and exported["args"]["checkpoint_dir"] == "ckpt"
    assert "train_state" not in exported and "optimizer_state" not in exported
    code, err = exit_code_and_err(["--checkpoint", str(small)], capsys)
    assert code == 2 and "inference-only" in err
    assert f"python3 run.py -m vgg2_0_2 --init_from {small}" in err


def test_diverged_weights_are_never_saved_even_on_ctrl_c(tiny_csv, tmp_path, monkeypatch, capsys):
    """The loss turns NaN after the first validation (step 4); a Ctrl-C at step 6 (before the
    next finiteness check) must not write the NaN weights over the good `last` checkpoint."""
    real_generator, real_augment = train.batch_generator, train.augment
    step = {"n": 0}

    def counting(seed, epoch, batch):
        step["n"] = epoch * 8 + batch
        if step["n"] == 6:
            signal.raise_signal(signal.SIGINT)
        return real_generator(seed, epoch, batch)

    def poisoned(images, generator, args):
        x = real_augment(images, generator, args)
        return x * float("nan") if step["n"] >= 4 else x
    monkeypatch.setattr(train, "batch_generator", counting)
    monkeypatch.setattr(train, "augment", poisoned)
    code, err = exit_code_and_err(quick_run(tiny_csv, tmp_path, "--epoch_num", "3", "--batch_size", "32",
                                            "--num_iter_to_validate", "4"), capsys)
    assert code == 2 and "no longer finite" in err and "last good" in err
    last = torch.load(tmp_path / "ckpt/r/vgg2_0_2_last.pth", weights_only=True)
    assert last["train_state"]["step"] == 4
    assert all(v.isfinite().all() for v in last["model_state"].values() if v.is_floating_point())


def test_a_loss_that_diverges_after_a_save_says_how_to_start_again(tiny_csv, tmp_path, monkeypatch, capsys):
    real_augment, calls = train.augment, {"n": 0}

    def poisoned(images, generator, args):  # the fifth step's loss is NaN: after the first save (step 4)
        calls["n"] += 1
        x = real_augment(images, generator, args)
        return x * float("nan") if calls["n"] >= 5 else x
    monkeypatch.setattr(train, "augment", poisoned)
    code, err = exit_code_and_err(quick_run(tiny_csv, tmp_path, "--epoch_num", "3", "--batch_size", "32",
                                            "--num_iter_to_validate", "4"), capsys)
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert code == 2 and "last good ones" in err and "another --run_name" in err, err
    assert f"--init_from {last}" in err and last.exists()


def test_resume_says_when_best_is_newer_than_last(tiny_csv, tmp_path, capsys):
    assert run.main(quick_run(tiny_csv, tmp_path, "--epoch_num", "2")) == 0
    folder = tmp_path / "ckpt" / "r"
    ckpt = torch.load(folder / "vgg2_0_2_last.pth", weights_only=True)
    ckpt["train_state"]["step"] = 4
    torch.save(ckpt, folder / "vgg2_0_2_last.pth")
    later = time.time() + 60
    os.utime(folder / "vgg2_0_2_best.pth", (later, later))  # as when a kill cut a save short
    capsys.readouterr()
    assert run.main(["--checkpoint", str(folder / "vgg2_0_2_last.pth"), "-o", str(tmp_path / "o")]) == 0
    assert f"{folder / 'vgg2_0_2_best.pth'} is newer than" in capsys.readouterr().out


# ----------------------------------------------------------------------------- third pass (issue 30)

@pytest.fixture(scope="module")
def finished_run(tiny_csv, tmp_path_factory):
    """The folders (ckpt/r, out/r) of one quick run, trained once for the tests that copy them."""
    base = tmp_path_factory.mktemp("finished")
    assert run.main(quick_run(tiny_csv, base)) == 0
    return base


def copy_run(base, tmp_path):
    for folder in ("ckpt", "out"):
        shutil.copytree(base / folder, tmp_path / folder)

@pytest.mark.parametrize("name", [os.path.join("..", "..", "x"), "..", ".", "", "a/b", "ABSOLUTE"])
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused_before_anything_is_written(
        tiny_csv, tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    argv = quick_run(tiny_csv, tmp_path)
    argv[argv.index("--run_name") + 1] = str(tmp_path / "abs" / "x") if name == "ABSOLUTE" else name
    code, err = exit_code_and_err(argv, capsys)
    assert code == 2 and "--run_name" in err and len(err.strip().splitlines()) == 1, err
    assert set(os.listdir(tmp_path)) <= {"cache"} and not (tmp_path.parent / "x").exists()


def test_resuming_a_finished_run_from_its_best_checkpoint_is_refused(finished_run, tmp_path, capsys):
    copy_run(finished_run, tmp_path)
    folder = tmp_path / "ckpt" / "r"
    before = (folder / "vgg2_0_2_last.pth").read_bytes()
    code, err = exit_code_and_err(["--checkpoint", str(folder / "vgg2_0_2_best.pth"), "-o", str(tmp_path / "out")],
                                  capsys)
    assert code == 2 and "is the run's best checkpoint" in err and f"--checkpoint {folder / 'vgg2_0_2_last.pth'}" in err
    assert "--init_from" in err and (folder / "vgg2_0_2_last.pth").read_bytes() == before


def test_a_finished_run_without_its_test_report_is_tested_on_resume(finished_run, tmp_path, capsys):
    copy_run(finished_run, tmp_path)
    shutil.rmtree(tmp_path / "out" / "r" / "test")  # as when the final test was cut short
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert run.main(["--checkpoint", str(last), "-o", str(tmp_path / "out")]) == 0
    assert "has no test report: testing its best checkpoint now" in capsys.readouterr().out
    assert (tmp_path / "out" / "r" / "test" / "metrics.json").exists()
    # Now it has one: resuming again only says how to train further, with the run's -o.
    assert run.main(["--checkpoint", str(last), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"To train it further: python3 run.py --checkpoint {last} -o {tmp_path / 'out'} --epoch_num N" in out


def test_resuming_on_other_faces_with_the_same_class_counts_is_refused(finished_run, tiny_csv, tmp_path, capsys):
    import pandas as pd
    copy_run(finished_run, tmp_path)
    table = pd.read_csv(tiny_csv)
    table["pixels"] = table["pixels"].sample(frac=1, random_state=0).to_numpy()  # faces moved, counts kept
    other = tmp_path / "shuffled.csv"
    table.to_csv(other, index=False)
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    code, err = exit_code_and_err(["--checkpoint", str(last), "--epoch_num", "2", "-d", str(other),
                                   "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "is not the data set this run was trained on (its faces, labels" in err, err
    assert run.main(["--checkpoint", str(last), "--epoch_num", "2", "-d", tiny_csv, "-o", str(tmp_path / "out")]) == 0


def test_a_new_run_never_overwrites_another_runs_outputs(tiny_csv, finished_run, tmp_path, capsys):
    copy_run(finished_run, tmp_path)
    outputs = tmp_path / "out" / "r"
    before = {p.name: p.read_bytes() for p in outputs.glob("*.json")}
    argv = quick_run(tiny_csv, tmp_path)
    argv[argv.index("--checkpoint_dir") + 1] = str(tmp_path / "other_ckpt")
    code, err = exit_code_and_err(argv, capsys)
    assert code == 2 and f"{outputs} already holds the outputs of another run" in err, err
    assert "--run_name" in err and "-o" in err
    assert {p.name: p.read_bytes() for p in outputs.glob("*.json")} == before
    assert not (tmp_path / "other_ckpt").exists()  # nothing left behind by the refused run


@pytest.mark.parametrize("junk", ["other_model", "junk_tensors", "junk_train_state"])
def test_resuming_with_weights_that_do_not_fit_is_one_line_naming_the_file(finished_run, tmp_path, capsys, junk):
    from models import FerNet
    copy_run(finished_run, tmp_path)
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    ckpt = torch.load(last, weights_only=True)
    if junk == "other_model":
        ckpt["model_state"] = FerNet("vgg2_2_2").state_dict()
    elif junk == "junk_tensors":
        ckpt["model_state"] = {k: torch.zeros(3) for k in ckpt["model_state"]}
    else:
        ckpt["train_state"] = {"step": "many", "colour": "blue"}
    torch.save(ckpt, last)
    code, err = exit_code_and_err(["--checkpoint", str(last), "--epoch_num", "2"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert str(last) in err and "Traceback" not in err
    assert not (tmp_path / "ckpt" / "r" / ".lock").exists()


def test_a_read_only_checkpoint_folder_is_one_error_line(finished_run, tmp_path, capsys, read_only):
    copy_run(finished_run, tmp_path)
    folder = tmp_path / "ckpt" / "r"
    read_only(folder)
    code, err = exit_code_and_err(["--checkpoint", str(folder / "vgg2_0_2_last.pth"), "--epoch_num", "2",
                                   "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"cannot write to {folder}" in err and "Read-only file system" in err


@pytest.mark.parametrize("script", ["run.py", "infer.py"])
def test_ctrl_c_while_the_imports_load_prints_no_traceback(script):
    """The signal comes once PyTorch's library is mapped, while its Python modules still load."""
    process = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    end = time.time() + 60
    while "libtorch" not in open(f"/proc/{process.pid}/maps").read():
        assert process.poll() is None and time.time() < end, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0 and "usage" not in out  # it stopped during the imports
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_the_run_folder_lock_of_a_starting_run_is_never_taken_over(tiny_csv, tmp_path, capsys):
    """A run between creating its lock and writing its process number into it still owns it."""
    import fcntl
    folder = tmp_path / "ckpt" / "r"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)  # held, nothing written yet
        code, err = exit_code_and_err(quick_run(tiny_csv, tmp_path), capsys)
        assert code == 2 and f"another run is using {folder}" in err, err
        assert (folder / ".lock").exists() and not list(folder.glob("*.pth"))


@pytest.mark.parametrize("flag", ["-d", "--checkpoint_dir", "-o", "--init_from", "--teacher", "--checkpoint"])
def test_empty_paths_are_refused_before_anything_is_written(tiny_csv, tmp_path, capsys, monkeypatch, flag):
    """An empty --checkpoint_dir used to put the run folder into the current folder."""
    monkeypatch.chdir(tmp_path)
    code, err = exit_code_and_err(quick_run(tiny_csv, tmp_path) + [flag, ""], capsys)
    assert code == 2 and "an empty path" in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_dir_that_is_a_file_and_a_folder_given_as_a_file_are_one_line(tiny_csv, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = quick_run(tiny_csv, tmp_path)
    argv[argv.index("--checkpoint_dir") + 1] = str(blocker)
    code, err = exit_code_and_err(argv, capsys)
    assert code == 2 and f"cannot write to {blocker / 'r'}" in err and len(err.strip().splitlines()) == 1, err
    for flag in ("--init_from", "--teacher"):
        code, err = exit_code_and_err(quick_run(tiny_csv, tmp_path, flag, str(tmp_path)), capsys)
        assert code == 2 and f"{tmp_path} is a folder, not a checkpoint file" in err, err
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # the run name is claimed before the data is read
