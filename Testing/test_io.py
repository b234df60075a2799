"""CT input: real scans in every format, and one test per bad-input case."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import write_series

from CovidCTDxLib.errors import CovidCTDxError, GeometryError, InputError, NotCTError, VolumeTooLargeError
from CovidCTDxLib.io.readers import read_ct
from CovidCTDxLib.io.segmentation_file import read_segmentation, write_segmentation, write_volume
from CovidCTDxLib.volume import CTVolume


def tiny_chest(shape=(24, 96, 96), spacing=(2.5, 2.5, 3.0)) -> CTVolume:
    """Air, an elliptic body of soft tissue, two lungs at -850 HU: enough to pass validation."""
    nz, ny, nx = shape
    y, x = np.mgrid[:ny, :nx]
    body = ((x - nx / 2) / (0.42 * nx)) ** 2 + ((y - ny / 2) / (0.32 * ny)) ** 2 < 1
    right = ((x - 0.32 * nx) / (0.12 * nx)) ** 2 + ((y - ny / 2) / (0.2 * ny)) ** 2 < 1
    left = ((x - 0.68 * nx) / (0.12 * nx)) ** 2 + ((y - ny / 2) / (0.2 * ny)) ** 2 < 1
    sl = np.where(body, 40, -1000).astype(np.int16)
    sl[right | left] = -850
    array = np.repeat(sl[None], nz, axis=0)
    array += np.random.default_rng(0).normal(0, 10, array.shape).astype(np.int16)
    return CTVolume(array, spacing, (-120.0, -120.0, -300.0), np.eye(3))


def write_image(array: np.ndarray, path: Path, spacing=None) -> Path:
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


# ----------------------------------------------------------------- real scans
def test_real_nifti_reads_as_validated_hu(a0001_nii):
    ct = read_ct(a0001_nii)
    assert ct.shape == (64, 512, 512)
    assert ct.array.dtype == np.int16
    assert np.allclose(ct.spacing, (0.841796875, 0.841796875, 5.0))
    assert np.allclose(ct.origin, (-228.04, -93.06, -439.0), atol=0.01)
    assert np.allclose(ct.direction, np.eye(3))
    assert ct.array.min() >= -1100 and ct.array.max() > 500


@pytest.mark.realdata
def test_real_dicom_and_nifti_give_identical_arrays_and_geometry(covid_dicom_dir, tmp_path):
    """The JPEG-lossless real COVID series read as DICOM, and its NIfTI conversion, agree."""
    from_dicom = read_ct(covid_dicom_dir)
    assert from_dicom.shape == (148, 512, 512)
    assert from_dicom.metadata["format"] == "dicom"
    assert np.allclose(from_dicom.spacing, (0.748046875, 0.748046875, 2.0))
    # Rescale intercept -1024 applied: outside air is about -1000 HU, not 0.
    assert np.median(from_dicom.array[:, :20, :20]) < -900
    nifti = write_volume(from_dicom, tmp_path / "covid.nii.gz")
    from_nifti = read_ct(nifti)
    assert np.array_equal(from_dicom.array, from_nifti.array)
    assert np.allclose(from_dicom.spacing, from_nifti.spacing, atol=1e-5)
    assert np.allclose(from_dicom.origin, from_nifti.origin, atol=1e-3)
    assert np.allclose(from_dicom.direction, from_nifti.direction, atol=1e-6)


@pytest.mark.realdata
def test_dicom_slices_are_sorted_by_position_not_file_name(covid_dicom_dir):
    ct = read_ct(covid_dicom_dir)
    z = ct.index_to_lps(np.array([[0, 0, k] for k in range(ct.shape[0])]))[:, 2]
    assert np.all(np.diff(z) > 0)  # inferior → superior, evenly spaced
    assert np.allclose(np.diff(z), 2.0, atol=0.01)


def test_real_nifti_round_trips_through_dicom(a0001_nii, tmp_path):
    ct = read_ct(a0001_nii)
    write_series(ct, tmp_path / "dicom")
    back = read_ct(tmp_path / "dicom")
    assert np.array_equal(back.array, ct.array)
    assert np.allclose(back.spacing, ct.spacing, atol=1e-4)
    assert np.allclose(back.origin, ct.origin, atol=1e-3)
    assert np.allclose(back.direction, ct.direction, atol=1e-6)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    ct = tiny_chest()
    write_series(ct, tmp_path / "s", intercept=-2048.0, slope=2.0)
    back = read_ct(tmp_path / "s")
    assert np.abs(back.array.astype(int) - ct.array.astype(int)).max() <= 1


def test_nrrd_mha_and_nifti_agree(tmp_path):
    ct = tiny_chest()
    arrays = [read_ct(write_volume(ct, tmp_path / f"x{ext}")) for ext in (".nrrd", ".mha", ".nii.gz")]
    for other in arrays:
        assert np.array_equal(other.array, ct.array)
        assert np.allclose(other.spacing, ct.spacing)
        assert np.allclose(other.origin, ct.origin, atol=1e-4)


def test_segmentation_round_trip_with_overlapping_segments(tmp_path):
    ct = tiny_chest()
    lungs = ct.array < -500
    lesion = np.zeros(ct.shape, bool)
    lesion[10:14, 40:50, 20:30] = True
    lesion &= lungs
    path = write_segmentation(ct, {"right_lung": lungs, "lesion": lesion}, tmp_path / "s.seg.nrrd")
    back = read_segmentation(path, ct)
    assert np.array_equal(back.masks["right_lung"], lungs)
    assert np.array_equal(back.masks["lesion"], lesion)


def test_segmentation_saved_cropped_is_placed_back_on_the_ct_grid(tmp_path):
    """Slicer saves seg.nrrd cropped to the segments' extent with a shifted origin."""
    import nrrd

    ct = tiny_chest()
    lesion = np.zeros(ct.shape, bool)
    lesion[5:9, 30:40, 50:61] = True
    crop = lesion[5:9, 30:40, 50:61].transpose(2, 1, 0).astype(np.uint8)
    origin = ct.index_to_lps(np.array([50, 30, 5]))
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag(ct.spacing),
        "space origin": origin,
        "Segment0_ID": "Segment_1",
        "Segment0_Name": "lesion",
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
    }
    nrrd.write(str(tmp_path / "edited.seg.nrrd"), crop, header, index_order="F")
    back = read_segmentation(tmp_path / "edited.seg.nrrd", ct)
    assert np.array_equal(back.masks["lesion"], lesion)


# ----------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_ct(tmp_path / "nope.nii.gz")


def test_empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_ct(tmp_path / "empty.nii.gz")


def test_corrupt_file(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(InputError):
        read_ct(tmp_path / "junk.nii.gz")


def test_truncated_file(tmp_path):
    full = write_volume(tiny_chest(), tmp_path / "full.nii")
    data = full.read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        read_ct(tmp_path / "cut.nii")


def test_truncated_gzip(tmp_path):
    full = write_volume(tiny_chest(), tmp_path / "full.nii")
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(full.read_bytes())[:4000])
    with pytest.raises(InputError):
        read_ct(tmp_path / "cut.nii.gz")


def test_non_image_file(tmp_path):
    (tmp_path / "notes.nrrd").write_text("this is a clinical note, not an image\n" * 20)
    with pytest.raises(InputError, match="not a readable image"):
        read_ct(tmp_path / "notes.nrrd")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(InputError, match="no DICOM files"):
        read_ct(tmp_path)


def test_2d_image(tmp_path):
    path = write_image(tiny_chest().array[10], tmp_path / "slice.nrrd")
    with pytest.raises(GeometryError, match="3D"):
        read_ct(path)


def test_single_slice_volume(tmp_path):
    path = write_image(tiny_chest().array[10:11], tmp_path / "one.nrrd")
    with pytest.raises(GeometryError, match="single slice"):
        read_ct(path)


def test_4d_image(tmp_path):
    arr = np.stack([tiny_chest().array] * 3)
    image = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in arr])
    sitk.WriteImage(image, str(tmp_path / "t.nrrd"))
    with pytest.raises(GeometryError, match="4D"):
        read_ct(tmp_path / "t.nrrd")


@pytest.mark.parametrize("modality", ["MR", "PT", "SEG"])
def test_non_ct_modality_dicom(tmp_path, modality):
    write_series(tiny_chest(), tmp_path, modality=modality)
    with pytest.raises(NotCTError, match=modality):
        read_ct(tmp_path)


def test_non_ct_series_beside_ct_is_ignored(tmp_path):
    ct = tiny_chest()
    write_series(ct, tmp_path, modality="CT", prefix="ct")
    write_series(ct, tmp_path, modality="MR", prefix="mr")
    assert np.array_equal(read_ct(tmp_path).array, ct.array)


def test_mixed_ct_series_in_one_folder(tmp_path):
    ct = tiny_chest()
    write_series(ct, tmp_path, prefix="a")
    write_series(ct, tmp_path, prefix="b")
    with pytest.raises(InputError, match="2 CT series"):
        read_ct(tmp_path)


def test_mixed_series_can_be_chosen_by_uid(tmp_path):
    ct = tiny_chest()
    uid = write_series(ct, tmp_path, prefix="a")
    write_series(ct, tmp_path, prefix="b")
    assert read_ct(tmp_path, series_uid=uid).shape == ct.shape


def test_raw_values_without_rescale_are_not_hu(tmp_path):
    ct = tiny_chest()
    raw = (ct.array.astype(np.int32) + 1024).astype(np.int16)  # stored values, intercept lost
    with pytest.raises(NotCTError, match="HU|air"):
        read_ct(write_volume(ct, tmp_path / "raw.nrrd", raw))


def test_label_map_is_not_ct(tmp_path):
    ct = tiny_chest()
    labels = (ct.array < -500).astype(np.int16)
    with pytest.raises(NotCTError):
        read_ct(write_volume(ct, tmp_path / "labels.nrrd", labels))


def test_absurd_values_are_not_hu(tmp_path):
    ct = tiny_chest()
    mr_like = (ct.array.astype(np.float32) + 1000.0) * 50.0
    with pytest.raises(NotCTError, match="cannot be Hounsfield"):
        read_ct(write_volume(ct, tmp_path / "mr.nrrd", mr_like))


@pytest.mark.parametrize("spacing,message", [((0.0, 3.0, 3.0), "spacing"), ((3.0, 3.0, 80.0), "outside")])
def test_bad_spacing_in_file(tmp_path, spacing, message):
    import nrrd

    ct = tiny_chest()
    header = {"space": "left-posterior-superior", "space directions": np.diag(spacing), "space origin": np.zeros(3)}
    nrrd.write(str(tmp_path / "bad.nrrd"), ct.array.transpose(2, 1, 0), header, index_order="F")
    with pytest.raises(InputError, match=message):
        read_ct(tmp_path / "bad.nrrd")


@pytest.mark.parametrize("spacing", [(0.0, 2.0, 2.0), (2.0, -2.0, 2.0), (float("nan"), 2.0, 2.0), (2.0, 2.0, 500.0)])
def test_bad_spacing_in_memory(spacing):
    """Volumes handed over by a script or a Slicer node are validated the same way."""
    ct = tiny_chest()
    with pytest.raises(GeometryError, match="spacing|Spacing"):
        CTVolume(ct.array, spacing, ct.origin, ct.direction).validate()


def test_missing_spacing_in_dicom(tmp_path):
    import pydicom

    write_series(tiny_chest(), tmp_path)
    for f in tmp_path.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    with pytest.raises(GeometryError, match="ImagePositionPatient"):
        read_ct(tmp_path)


def test_volume_too_small_for_a_chest(tmp_path):
    ct = tiny_chest()
    small = write_image(ct.array[:, 40:56, 40:56], tmp_path / "small.nrrd", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(GeometryError, match="too small"):
        read_ct(small)


def test_volume_too_large_is_refused_before_reading_pixels(tmp_path):
    """A header claiming 4096³ voxels with no data behind it: refused from the header alone."""
    header = tmp_path / "huge.nhdr"
    header.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 4096 4096 4096\n"
        "space directions: (0.5,0,0) (0,0.5,0) (0,0,0.5)\nencoding: raw\nendian: little\ndata file: huge.raw\n\n"
    )
    (tmp_path / "huge.raw").write_bytes(b"")
    with pytest.raises(VolumeTooLargeError, match="GiB"):
        read_ct(header)


def test_large_dicom_refused_with_estimate(tmp_path, monkeypatch):
    write_series(tiny_chest(), tmp_path)
    monkeypatch.setenv("COVIDCTDX_MAX_VOLUME_BYTES", "1000")
    with pytest.raises(VolumeTooLargeError, match="GiB"):
        read_ct(tmp_path)


def test_every_error_is_one_family():
    for cls in (InputError, NotCTError, GeometryError, VolumeTooLargeError):
        assert issubclass(cls, CovidCTDxError)


def test_writing_is_atomic(tmp_path):
    ct = tiny_chest()
    out = write_volume(ct, tmp_path / "ct.nrrd")
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nrrd"]
    with pytest.raises(InputError, match="unsupported"):
        write_volume(ct, tmp_path / "ct.png")
    assert out.exists()
