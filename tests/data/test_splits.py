from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farcluss.data.splits import Sample, duplicates_between, make_splits, read_split, write_split
from farcluss.errors import ConfigError, DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_labeled_split_joins_root_and_skips_comments(tmp_path):
    split = write(
        tmp_path / "labeled.txt",
        "# VOC 2012, 3 labeled images\n"
        "JPEGImages/a.jpg SegmentationClass/a.png\n"
        "\n"
        "JPEGImages/b.jpg SegmentationClass/b.png  # trailing comment\n"
        "/abs/c.jpg /abs/c.png\n",
    )
    samples = read_split(split, "/data/voc", require_mask=True)
    assert samples == [
        Sample(Path("/data/voc/JPEGImages/a.jpg"), Path("/data/voc/SegmentationClass/a.png")),
        Sample(Path("/data/voc/JPEGImages/b.jpg"), Path("/data/voc/SegmentationClass/b.png")),
        Sample(Path("/abs/c.jpg"), Path("/abs/c.png")),
    ]
    assert samples[0].name == "a"


def test_read_unlabeled_split_accepts_lines_with_and_without_mask(tmp_path):
    split = write(tmp_path / "unlabeled.txt", "img/a.png\nimg/b.png masks/b.png\n")
    samples = read_split(split, tmp_path, require_mask=False)
    assert samples == [
        Sample(tmp_path / "img/a.png", None),
        Sample(tmp_path / "img/b.png", tmp_path / "masks/b.png"),
    ]


@pytest.mark.parametrize(
    "text, require_mask, message",
    [
        ("a.png a.mask\nb.png b.mask c.png\n", True, ":2: expected 'image [mask]', got 3 fields"),
        ("a.png a_mask.png\n\n# comment\nb.png\n", True, ":4: labeled line has no mask path"),
        ("# only a comment\n\n", False, "lists no samples"),
    ],
)
def test_read_split_errors_name_file_and_line(tmp_path, text, require_mask, message):
    split = write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError) as raised:
        read_split(split, tmp_path, require_mask=require_mask)
    assert str(split) in str(raised.value)
    assert message in str(raised.value)


def test_missing_split_file_is_named(tmp_path):
    with pytest.raises(DataError, match="split file .*nope.txt not found"):
        read_split(tmp_path / "nope.txt", tmp_path, require_mask=False)


def test_write_then_read_round_trips_relative_and_absolute_paths(tmp_path):
    samples = [
        Sample(tmp_path / "images/a.png", tmp_path / "masks/a.png"),
        Sample(tmp_path / "images/b.png", None),
        Sample(Path("/elsewhere/c.png"), None),
    ]
    path = write_split(tmp_path / "splits/out.txt", samples, tmp_path)
    expected = ["images/a.png masks/a.png", "images/b.png", "/elsewhere/c.png"]
    assert path.read_text().splitlines() == expected
    assert read_split(path, tmp_path, require_mask=False) == samples


def test_duplicates_between_finds_shared_images():
    labeled = [
        Sample(Path("/d/a.png"), Path("/d/a_m.png")),
        Sample(Path("/d/b.png"), Path("/d/b_m.png")),
    ]
    unlabeled = [Sample(Path("/d/b.png")), Sample(Path("/d/c.png"))]
    assert duplicates_between(labeled, unlabeled) == [Path("/d/b.png")]
    assert duplicates_between(labeled[:1], unlabeled) == []


def make_folder(root: Path, count: int, without_mask: int = 0) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pixel = np.zeros((4, 4, 3), dtype=np.uint8)
    for i in range(count + without_mask):
        suffix = ".jpg" if i % 2 else ".png"
        Image.fromarray(pixel).save(root / "images" / f"img{i:02d}{suffix}")
        if i < count:
            Image.fromarray(pixel[..., 0]).save(root / "masks" / f"img{i:02d}.png")
    return root


def read_images(path: Path, root: Path):
    return [sample.image for sample in read_split(path, root, require_mask=False)]


def test_make_splits_from_folder_by_count_is_disjoint_complete_and_seeded(tmp_path):
    folder = make_folder(tmp_path / "ds", count=10, without_mask=2)
    first = make_splits(tmp_path / "s1", folder=folder, labeled=3, seed=7, val=2)
    again = make_splits(tmp_path / "s2", folder=folder, labeled=3, seed=7, val=2)
    other = make_splits(tmp_path / "s3", folder=folder, labeled=3, seed=8, val=2)
    assert set(first) == {"labeled", "unlabeled", "val"}

    labeled = read_split(first["labeled"], folder, require_mask=True)
    val = read_split(first["val"], folder, require_mask=True)
    unlabeled = read_split(first["unlabeled"], folder, require_mask=False)
    assert (len(labeled), len(val), len(unlabeled)) == (3, 2, 7)
    images = [s.image for s in labeled + val + unlabeled]
    assert len(set(images)) == 12  # disjoint and complete
    assert {p.name for p in images} == {p.name for p in (folder / "images").iterdir()}
    # Unlabeled keeps mask paths where they exist; the two mask-less images come without.
    assert sum(s.mask is None for s in unlabeled) == 2
    assert all(s.mask == folder / "masks" / f"{s.image.stem}.png" for s in labeled)

    for name in first:
        assert first[name].read_text() == again[name].read_text()
    assert first["labeled"].read_text() != other["labeled"].read_text()


def test_a_test_split_is_drawn_after_val_and_leaves_val_unchanged(tmp_path):
    folder = make_folder(tmp_path / "ds", count=10, without_mask=2)
    plain = make_splits(tmp_path / "s1", folder=folder, labeled=3, seed=7, val=2)
    held = make_splits(tmp_path / "s2", folder=folder, labeled=3, seed=7, val=2, test=3)
    assert set(held) == {"labeled", "unlabeled", "val", "test"}
    assert held["val"].read_text() == plain["val"].read_text()
    parts = {name: read_split(path, folder, require_mask=False) for name, path in held.items()}
    assert {name: len(samples) for name, samples in parts.items()} == {
        "labeled": 3, "unlabeled": 4, "val": 2, "test": 3}
    images = [s.image for samples in parts.values() for s in samples]
    assert len(set(images)) == 12  # disjoint and complete
    assert all(s.mask is not None for s in parts["test"])
    with pytest.raises(DataError, match="2 val \\+ 6 test \\+ 3 labeled"):
        make_splits(tmp_path / "s3", folder=folder, labeled=3, seed=7, val=2, test=6)


def test_make_splits_from_list_by_ratio(tmp_path):
    lines = "".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in range(20))
    lines += "JPEGImages/3.jpg\n"  # listed again without its mask: counted once, mask kept
    source = write(tmp_path / "train.txt", lines)
    written = make_splits(tmp_path / "out", source_list=source, root=tmp_path, labeled=0.25, seed=0)
    assert set(written) == {"labeled", "unlabeled"}
    labeled = read_images(written["labeled"], tmp_path)
    unlabeled = read_images(written["unlabeled"], tmp_path)
    assert len(labeled) == 5 and len(unlabeled) == 15
    assert set(labeled).isdisjoint(unlabeled)
    assert set(labeled) | set(unlabeled) == {tmp_path / f"JPEGImages/{i}.jpg" for i in range(20)}
    # The ratio and the equivalent count give the same split for the same seed.
    by_count = make_splits(tmp_path / "out2", source_list=source, root=tmp_path, labeled=5, seed=0)
    assert by_count["labeled"].read_text() == written["labeled"].read_text()


def test_make_splits_rejects_impossible_requests(tmp_path):
    folder = make_folder(tmp_path / "ds", count=3, without_mask=3)
    with pytest.raises(DataError, match="only 3 of 6 samples have a mask"):
        make_splits(tmp_path / "out", folder=folder, labeled=4)
    with pytest.raises(ConfigError, match="ratio must lie in"):
        make_splits(tmp_path / "out", folder=folder, labeled=1.5)
    with pytest.raises(DataError, match="leaves none unlabeled"):
        make_splits(tmp_path / "out", folder=make_folder(tmp_path / "all", count=3), labeled=3)
