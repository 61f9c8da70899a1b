"""Process-level helpers: memory reuse for large tensors, the CPU's bf16 check, new output folders."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and frees a 64 MB tensor again and again, as a training step does with its
# activations, and prints the page faults of each round.
FAULTS_PER_ROUND = """
import json, resource, sys, torch, utils
took = utils.reuse_freed_memory(torch.device("cpu")) if sys.argv[1] == "reuse" else None
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults}))
"""


def faults_per_round(mode):
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, mode], cwd=ROOT, check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_freed_memory_stops_large_tensors_faulting_in_again():
    plain, reuse = faults_per_round("plain"), faults_per_round("reuse")
    if not reuse["took"]:
        pytest.skip("this C library has no mallopt")
    fresh, reused = min(plain["faults"][-5:]), max(reuse["faults"][-5:])
    if fresh < 100:  # e.g. huge pages: a 64 MB block faults in a few times, nothing to compare
        pytest.skip(f"large blocks fault in only {fresh} times per round here")
    # By default every round maps fresh memory and faults it in again; with reuse, once the heap
    # has grown to fit, the rounds reuse memory already touched: far fewer faults, whatever the
    # page size.
    assert reused * 10 < fresh, (plain, reuse)


@pytest.mark.parametrize("machine, avx512_bf16, amx, native", [
    ("x86_64", False, False, False),  # plain AVX512: oneDNN emulates bf16, 4x slower than fp32
    ("x86_64", True, False, True),
    ("x86_64", False, True, True),
    ("aarch64", False, False, True),  # elsewhere oneDNN's answer stands
])
def test_amp_picks_bf16_only_where_the_cpu_computes_it(monkeypatch, machine, avx512_bf16, amx, native):
    import platform
    import torch
    import utils
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert utils.amp_dtype_for(cpu) == (torch.bfloat16 if native else None)
    assert utils.autocast_dtype(None, cpu) == (torch.bfloat16 if native else None)  # the default
    assert utils.autocast_dtype(False, cpu) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert utils.amp_dtype_for(cpu) is None


def test_new_folder_moves_aside_from_earlier_results_and_refuses_a_file(tmp_path, monkeypatch):
    import utils
    monkeypatch.chdir(tmp_path)
    os.mkdir("out")
    assert utils.new_folder("out/", empty_is_new=True) == "out"  # empty: the user's folder
    open(os.path.join("out", "faces.csv"), "w").close()
    assert utils.new_folder("out/", empty_is_new=True) == "out_2"  # beside it, not out/_2 inside it
    assert utils.new_folder("out") == "out_3"
    os.chdir("out")  # `-o .` in a folder that holds results: its sibling by name, not a hidden ._2
    assert utils.new_folder(".") == str(tmp_path / "out_4")
    open(tmp_path / "results.txt", "w").close()
    with pytest.raises(utils.UserError, match="results.txt is a file, not a folder"):
        utils.new_folder(str(tmp_path / "results.txt"), empty_is_new=True)
