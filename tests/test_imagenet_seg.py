"""The gtsegs_ijcv.mat reader on files written here with h5py in the real layout."""
import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from data.imagenet_seg import ImagenetSegmentation, SegmentationDataError, check_gtsegs_file, resize_pair


def _write_real_layout(path, images, masks):
    """As MATLAB v7.3 stores a cell array of images and one of 1x1 cells of masks:
    data under /#refs#, arrays transposed (column-major), uint8."""
    ref = h5py.ref_dtype
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img = f.create_dataset("value/img", (len(images), 1), dtype=ref)
        gt = f.create_dataset("value/gt", (len(images), 1), dtype=ref)
        for i, (im, m) in enumerate(zip(images, masks)):
            d = refs.create_dataset(f"a{i}", data=im.transpose(2, 1, 0))  # (3, W, H)
            g = refs.create_dataset(f"b{i}", data=m.transpose(1, 0))  # (W, H)
            cell = refs.create_dataset(f"c{i}", (1, 1), dtype=ref)
            cell[0, 0] = g.ref
            img[i, 0] = d.ref
            gt[i, 0] = cell.ref


@pytest.fixture()
def mat(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(20, 30), (17, 11), (24, 24)]  # H != W catches a missing transpose
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    masks = [(rng.random((h, w)) < 0.4).astype(np.uint8) for h, w in shapes]
    path = tmp_path / "gtsegs_ijcv.mat"
    _write_real_layout(str(path), images, masks)
    return str(path), images, masks


def test_reads_same_pixels_and_masks(mat):
    path, images, masks = mat
    assert check_gtsegs_file(path) == 3
    raw = ImagenetSegmentation(path, raw=True)
    assert len(raw) == 3
    for i in range(3):
        im, m, idx = raw[i]
        assert idx == i and im.dtype == np.uint8 and m.dtype == np.uint8
        np.testing.assert_array_equal(im, images[i])
        np.testing.assert_array_equal(m, masks[i])


def test_published_indexing_expression(mat):
    path, images, masks = mat
    with h5py.File(path, "r") as f:  # METHODS.md §4, verbatim
        np.testing.assert_array_equal(f[f["/value/img"][1, 0]][()].transpose(2, 1, 0), images[1])
        np.testing.assert_array_equal(f[f[f["/value/gt"][1, 0]][0, 0]][()].transpose(1, 0), masks[1])


def test_resized_normalised_items(mat):
    path, images, masks = mat
    ds = ImagenetSegmentation(path, size=(16, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x, m, idx = ds[0]
    assert x.shape == (3, 16, 8) and x.dtype == torch.float32 and m.shape == (16, 8) and m.dtype == torch.int64
    want = np.asarray(Image.fromarray(images[0]).resize((8, 16), Image.BILINEAR)).transpose(2, 0, 1) / 255.0
    torch.testing.assert_close(x, torch.from_numpy((want - 0.5) / 0.5).float())
    want_m = np.asarray(Image.fromarray(masks[0]).resize((8, 16), Image.NEAREST))
    np.testing.assert_array_equal(m.numpy(), want_m)
    assert set(np.unique(m.numpy())) <= {0, 1}
    # same size: no resampling at all
    x2, m2, _ = ImagenetSegmentation(path, size=(24, 24))[2]
    np.testing.assert_array_equal(m2.numpy(), masks[2])
    torch.testing.assert_close(x2, torch.from_numpy((images[2].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5).float())


def test_mask_made_binary():
    img = np.zeros((4, 4, 3), np.uint8)
    mask = np.array([[0, 255, 0, 2]] * 4, np.uint8)
    _, m = resize_pair(img, mask, (4, 4))
    np.testing.assert_array_equal(m, (mask > 0).astype(np.uint8))


def test_lazy_handle_pickles_and_batches(mat):
    path, images, masks = mat
    ds = ImagenetSegmentation(path, size=(8, 8), indices=[2, 0])
    assert ds._file is None  # nothing opened until an item is read
    _ = ds[0]
    assert ds._file is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._file is None and clone[1][2] == 0
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    x, m, idx = next(iter(loader))
    assert x.shape == (2, 3, 8, 8) and idx.tolist() == [2, 0]
    assert ds.labels() is None  # the real layout has no labels
    ds.close()


def test_synthetic_writer_round_trip(tmp_path):
    from data.synthetic import generate_sample, write_gtsegs_mat

    path = str(tmp_path / "syn.mat")
    write_gtsegs_mat(path, 5, seed=2, size=32, split="val")
    with open(path, "rb") as fh:
        assert fh.read(10) == b"MATLAB 7.3"  # MATLAB's 512-byte header before the HDF5 data
    ds = ImagenetSegmentation(path, raw=True)
    for i in range(5):
        s = generate_sample(i, seed=2, size=32, split="val")
        im, m, _ = ds[i]
        np.testing.assert_array_equal(im, s.image)
        np.testing.assert_array_equal(m, s.mask)
    np.testing.assert_array_equal(ds.labels(), [generate_sample(i, 2, 32, "val").label for i in range(5)])


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.mat")
    with pytest.raises(SegmentationDataError, match="nowhere.mat: file not found"):
        ImagenetSegmentation(path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "old.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(SegmentationDataError, match=r"old.mat: not an HDF5 file"):
        ImagenetSegmentation(str(path))


@pytest.mark.parametrize("present,missing", [(["value/img"], "/value/gt"), (["value/gt"], "/value/img"),
                                             ([], "/value/img and /value/gt")])
def test_missing_datasets(tmp_path, present, missing):
    path = tmp_path / "partial.mat"
    with h5py.File(path, "w") as f:
        for name in present:
            f.create_dataset(name, (2, 1), dtype=h5py.ref_dtype)
    with pytest.raises(SegmentationDataError) as e:
        ImagenetSegmentation(str(path))
    assert "partial.mat" in str(e.value) and "missing dataset" in str(e.value) and missing in str(e.value)


def test_wrong_dataset_kind(tmp_path):
    path = tmp_path / "numbers.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("value/img", data=np.zeros((2, 1)))
        f.create_dataset("value/gt", data=np.zeros((2, 1)))
    with pytest.raises(SegmentationDataError, match="numbers.mat: /value/img must be an \\(n, 1\\) dataset of object references"):
        ImagenetSegmentation(str(path))


def test_bad_indices(mat):
    with pytest.raises(SegmentationDataError, match="outside 0..2"):
        ImagenetSegmentation(mat[0], indices=[0, 3])
