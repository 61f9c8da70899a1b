"""FER2013 CSV reading: every accepted variant, every bad input, the cache, the class chart."""
import gzip
import lzma
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import dataset
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_rows(n_per_split=3, seed=0):
    """Random faces: (images, labels, usage strings), every split present."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per_split
    images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    labels = np.arange(n) % 7
    usage = np.repeat(dataset.USAGES, n_per_split)
    return images, labels, usage


def csv_text(images, labels, usage, header="emotion,pixels,Usage", order=("emotion", "pixels", "Usage")):
    lines = [header]
    for img, label, use in zip(images, labels, usage):
        fields = {"emotion": str(label), "pixels": " ".join(map(str, img.ravel())), "Usage": use}
        lines.append(",".join(fields[c] for c in order))
    return "\n".join(lines) + "\n"


def write(path, text):
    path = str(path)
    if path.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    elif path.endswith(".xz"):
        with lzma.open(path, "wt") as f:
            f.write(text)
    elif path.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("fer2013.csv", text)
    else:
        with open(path, "w") as f:
            f.write(text)
    return path


def load(path, **kw):
    return dataset.load_fer2013(str(path), cache_dir=None, **kw)


@pytest.mark.parametrize("name", ["fer2013.csv", "fer2013.csv.gz", "fer2013.csv.xz", "fer2013.zip"])
def test_reads_plain_and_compressed(tmp_path, name):
    images, labels, usage = make_rows()
    data = load(write(tmp_path / name, csv_text(images, labels, usage)))
    assert data.images.dtype == np.uint8 and data.images.shape == (9, 48, 48)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    x, y = data.split("val")
    np.testing.assert_array_equal(x, images[3:6])
    np.testing.assert_array_equal(y, labels[3:6])


def test_reads_icml_face_data_variant(tmp_path):
    """icml_face_data.csv: columns `emotion, Usage, pixels` with leading spaces."""
    images, labels, usage = make_rows()
    text = csv_text(images, labels, usage, header="emotion, Usage, pixels",
                    order=("emotion", "Usage", "pixels"))
    data = load(write(tmp_path / "icml_face_data.csv", text))
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.split("test")[1], labels[6:])


def test_extreme_grey_levels_and_every_digit_count(tmp_path):
    images, labels, usage = make_rows()
    images[0] = 0
    images[1] = 255
    images[2].ravel()[:4] = [7, 42, 100, 9]
    data = load(write(tmp_path / "f.csv", csv_text(images, labels, usage)))
    np.testing.assert_array_equal(data.images, images)


def corrupt(tmp_path, row, field, value, header="emotion,pixels,Usage"):
    images, labels, usage = make_rows()
    lines = csv_text(images, labels, usage, header=header).splitlines()
    parts = lines[row + 1].split(",")
    parts[("emotion", "pixels", "Usage").index(field)] = value(parts)
    lines[row + 1] = ",".join(parts)
    return write(tmp_path / "bad.csv", "\n".join(lines) + "\n")


BAD_ROWS = {
    "too few pixels": ("pixels", lambda p: p[1].rsplit(" ", 1)[0], "2303 pixel values"),
    "too many pixels": ("pixels", lambda p: p[1] + " 5", "2305 pixel values"),
    "empty pixels": ("pixels", lambda p: "", "0 pixel values"),
    "non-numeric pixel": ("pixels", lambda p: "abc " + p[1].split(" ", 1)[1], "not whole numbers"),
    "pixel above 255": ("pixels", lambda p: "256 " + p[1].split(" ", 1)[1], "not whole numbers"),
    "negative pixel": ("pixels", lambda p: "-1 " + p[1].split(" ", 1)[1], "not whole numbers"),
    "label 7": ("emotion", lambda p: "7", "label outside 0-6"),
    "label text": ("emotion", lambda p: "happy", "label outside 0-6"),
    "unknown usage": ("Usage", lambda p: "Validation", "unknown Usage"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_line_and_reason(tmp_path, case):
    field, value, reason = BAD_ROWS[case]
    path = corrupt(tmp_path, 4, field, value)
    with pytest.raises(UserError) as err:
        load(path)
    message = str(err.value)
    assert "1 of 9 rows are bad" in message and "line 6" in message and reason in message
    assert "--skip-bad-rows" in message


def test_skip_bad_rows_drops_them_with_a_counted_warning(tmp_path):
    path = corrupt(tmp_path, 4, "emotion", lambda p: "9")
    messages = []
    data = dataset.load_fer2013(path, skip_bad_rows=True, cache_dir=None, log=messages.append)
    assert len(data.labels) == 8
    assert any("1 of 9 rows are bad" in m and "Dropped" in m for m in messages)


def test_many_bad_rows_show_the_first_lines_and_the_count(tmp_path):
    images, labels, usage = make_rows(n_per_split=4)
    labels[[1, 3, 5, 7, 9, 11]] = 8
    path = write(tmp_path / "f.csv", csv_text(images, labels, usage))
    with pytest.raises(UserError, match=r"6 of 12 rows are bad: line 3 .*line 11 .* and 1 more"):
        load(path)


def test_missing_columns(tmp_path):
    images, labels, usage = make_rows()
    text = csv_text(images, labels, usage).replace("emotion,pixels,Usage", "label,pixels,Usage")
    with pytest.raises(UserError, match="lacks the column.*emotion.*found: label, pixels, Usage"):
        load(write(tmp_path / "f.csv", text))


def test_empty_split_is_named(tmp_path):
    images, labels, usage = make_rows()
    usage[3:6] = "Training"
    data = load(write(tmp_path / "f.csv", csv_text(images, labels, usage)))
    with pytest.raises(UserError, match="no PublicTest rows"):
        data.split("val")


def test_missing_file_says_where_fer2013_comes_from(tmp_path):
    with pytest.raises(UserError, match="Kaggle.*-d synthetic"):
        load(tmp_path / "nope.csv")


@pytest.mark.parametrize("content", [b"", b"\x00\xff\x10 not a csv at all\n\x01"])
def test_empty_or_garbage_file(tmp_path, content):
    path = tmp_path / "f.csv"
    path.write_bytes(content)
    with pytest.raises(UserError):
        load(path)


def test_command_line_gives_one_message_and_exit_2(tmp_path):
    path = corrupt(tmp_path, 2, "pixels", lambda p: "1 2 3")
    result = subprocess.run([sys.executable, "dataset.py", "-d", path],
                            cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, FER_CACHE_DIR=str(tmp_path / "cache")))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "line 4 has 3 pixel values" in result.stderr
    assert "Traceback" not in result.stderr


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    images, labels, usage = make_rows()
    path = write(tmp_path / "f.csv", csv_text(images, labels, usage))
    cache = tmp_path / "cache"
    first = dataset.load_fer2013(path, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 1

    decoded = []
    real_decode = dataset.decode_csv
    monkeypatch.setattr(dataset, "decode_csv", lambda p: decoded.append(p) or real_decode(p))
    second = dataset.load_fer2013(path, cache_dir=str(cache))
    assert decoded == []  # served from the cache
    np.testing.assert_array_equal(first.images, second.images)

    labels[0] = 6  # a changed file (other size and time) must be parsed again
    write(path, csv_text(images, labels, usage) + "\n")
    third = dataset.load_fer2013(path, cache_dir=str(cache))
    assert decoded == [path] and third.labels[0] == 6


def test_unwritable_cache_only_warns(tmp_path):
    images, labels, usage = make_rows()
    path = write(tmp_path / "f.csv", csv_text(images, labels, usage))
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    messages = []
    data = dataset.load_fer2013(path, cache_dir=str(blocker / "cache"), log=messages.append)
    assert len(data.labels) == 9 and any("could not cache" in m for m in messages)


def test_class_table_and_chart_only_when_asked(tmp_path, capsys, monkeypatch):
    images, labels, usage = make_rows()
    path = write(tmp_path / "f.csv", csv_text(images, labels, usage))
    monkeypatch.chdir(tmp_path)
    assert dataset.main(["-d", path]) == 0
    assert "| Training | 3 | 1 | 1 | 1 | 0 | 0 | 0 | 0 |" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.png"))  # checking a file writes nothing
    assert dataset.main(["-d", path, "--chart", str(tmp_path / "classes.png")]) == 0
    assert os.path.getsize(tmp_path / "classes.png") > 1000


def test_a_file_without_a_split_that_training_needs_is_named(tmp_path, capsys):
    images, labels, usage = make_rows()
    keep = usage != "PublicTest"
    path = write(tmp_path / "f.csv", csv_text(images[keep], labels[keep], usage[keep]))
    assert dataset.main(["-d", path]) == 1
    assert "has no PublicTest rows" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.xz", ".zip"])
def test_a_damaged_compressed_file_is_named_and_exits_2(tmp_path, suffix):
    images, labels, usage = make_rows()
    text = csv_text(images, labels, usage).encode()
    path = tmp_path / f"fer{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("fer.csv", text)
    else:
        path.write_bytes((gzip.compress if suffix == ".csv.gz" else lzma.compress)(text))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # a damaged stretch in the compressed stream
    path.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "dataset.py", "-d", str(path)], cwd=ROOT,
                            capture_output=True, text=True,
                            env=dict(os.environ, FER_CACHE_DIR=str(tmp_path / "cache")))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {path} is damaged") and "Traceback" not in result.stderr


def test_a_huge_line_is_not_echoed_whole(tmp_path):
    path = tmp_path / "one-line.csv"
    path.write_text("x" * 5_000_000)  # one 5 MB line, no newline: a header of one odd column
    with pytest.raises(UserError) as err:
        load(path)
    assert len(str(err.value)) < 2000
