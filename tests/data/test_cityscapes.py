import numpy as np
import pytest
from PIL import Image

from farcluss.data.cityscapes import CITYSCAPES_CLASSES, convert_cityscapes, label_ids_to_train_ids
from farcluss.errors import DataError


def test_official_mapping_on_known_ids():
    label_ids = np.array([[7, 8, 26, 33], [0, 6, 9, 34], [24, 25, 31, 255]], dtype=np.uint8)
    expected = np.array([[0, 1, 13, 18], [255, 255, 255, 255], [11, 12, 16, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(label_ids_to_train_ids(label_ids), expected)
    assert CITYSCAPES_CLASSES[13] == "car" and CITYSCAPES_CLASSES[0] == "road"


def test_every_train_id_comes_from_exactly_one_label_id():
    train_ids = label_ids_to_train_ids(np.arange(34))
    assert sorted(train_ids[train_ids != 255].tolist()) == list(range(19))
    assert int((train_ids == 255).sum()) == 34 - 19
    # Ids outside the table (the license plate's -1, anything past 33) are ignored.
    np.testing.assert_array_equal(label_ids_to_train_ids(np.array([-1, 40, 1000])), [255, 255, 255])


def test_convert_writes_train_id_files_next_to_label_ids(tmp_path):
    city = tmp_path / "gtFine" / "train" / "aachen"
    city.mkdir(parents=True)
    label_ids = np.array([[7, 26], [0, 11]], dtype=np.uint8)
    source = city / "aachen_000000_000019_gtFine_labelIds.png"
    Image.fromarray(label_ids).save(source)
    # A colour file beside it is not a label-id file and must be left alone.
    Image.fromarray(label_ids).save(city / "aachen_000000_000019_gtFine_color.png")

    assert convert_cityscapes(tmp_path, progress=False) == 1
    target = city / "aachen_000000_000019_gtFine_labelTrainIds.png"
    written = Image.open(target)
    assert written.mode == "L"
    np.testing.assert_array_equal(np.asarray(written), [[0, 13], [255, 2]])


def test_convert_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"gtFine not found"):
        convert_cityscapes(tmp_path, progress=False)
    (tmp_path / "gtFine").mkdir()
    with pytest.raises(DataError, match=r"no \*_labelIds\.png files under"):
        convert_cityscapes(tmp_path, progress=False)
