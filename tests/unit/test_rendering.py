"""Rendering arithmetic (windowing, inversion, scaling) and encoding, without a server."""

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from exchange.dicom import rendering
from exchange.dicom.rendering import RenderingError, UndecodablePixels, Window
from tests.dicomdata import bundled


def _mono(photometric="MONOCHROME2", **attributes) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsStored = 16
    ds.PixelRepresentation = 1
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


# -- parameters ------------------------------------------------------------------


def test_window_parameter_is_parsed():
    assert rendering.parse_window("40,400") == Window(40.0, 400.0, "linear")
    assert rendering.parse_window(" -600 , 1500.5 , SIGMOID ") == Window(-600.0, 1500.5, "sigmoid")
    assert rendering.parse_window("0,0.5,linear_exact").width == 0.5


@pytest.mark.parametrize(
    "text",
    ["", "40", "40,400,9,9", "a,400", "40,b", "40,0", "40,-5", "40,400,cubic", "nan,1", "1e999,9"],
)
def test_bad_window_is_a_400_naming_the_problem(text):
    with pytest.raises(RenderingError) as raised:
        rendering.parse_window(text)
    assert raised.value.status == 400
    assert "window" in raised.value.message


@pytest.mark.parametrize(
    "text", ["", "10", "10,x", "0,10", "10,10,10", "-1,5", "99999,1", "\u00b2,4", "9" * 5000 + ",1"]
)
def test_bad_viewport_is_refused(text):
    with pytest.raises(RenderingError):
        rendering.parse_viewport(text)


@pytest.mark.parametrize("text", ["0", "101", "high", "9.5", "\u0663", "9" * 5000])
def test_bad_quality_is_refused(text):
    with pytest.raises(RenderingError):
        rendering.parse_quality(text)


# -- windowing -------------------------------------------------------------------


def test_linear_window_follows_ps33_c11_2_1_2_1():
    # c=40, w=400: everything <= -160 is black, everything > 239 is white.
    values = np.array([-1000, -160, -159, 40, 239, 240, 3000])
    out = rendering.apply_window(values, Window(40, 400))
    assert out.dtype == np.uint8
    # ((x - 39.5) / 399 + 0.5) * 255, rounded
    assert out.tolist() == [0, 0, 1, 128, 255, 255, 255]


def test_linear_exact_and_sigmoid_windows():
    values = np.array([-50.0, 0.0, 25.0, 50.0])
    assert rendering.apply_window(values, Window(0, 100, "linear_exact")).tolist() == [
        0,
        128,
        191,
        255,
    ]
    sigmoid = rendering.apply_window(values, Window(0, 100, "sigmoid"))
    assert sigmoid[1] == 128
    assert list(sigmoid) == sorted(sigmoid)  # monotonic
    assert 0 < sigmoid[0] < 128 < sigmoid[3] < 255


def test_width_one_is_a_threshold():
    out = rendering.apply_window(np.array([9, 10, 11]), Window(10.5, 1))
    assert out.tolist() == [0, 0, 255]


def test_modality_lut_is_applied_before_the_window():
    # Stored 500..550, slope 2, intercept -1024: HU -24..76; window 26.5,101 spans it exactly.
    frame = np.array([[500, 525, 550]], dtype=np.int16)
    ds = _mono(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=26.5, WindowWidth=101)
    assert rendering.display_image(frame, ds).tolist() == [[0, 128, 255]]


def test_dataset_window_is_the_default_and_a_given_window_wins():
    frame = np.array([[0, 100, 200]], dtype=np.int16)
    ds = _mono(WindowCenter=[150, 50], WindowWidth=[1, 1])  # the first of several is used
    assert rendering.display_image(frame, ds).tolist() == [[0, 0, 255]]
    given = rendering.display_image(frame, ds, Window(100.5, 201))
    assert given.tolist() == [[0, 128, 255]]


def test_without_a_window_the_full_range_is_used():
    frame = np.array([[-5, 0, 5, 15]], dtype=np.int16)
    image = rendering.display_image(frame, _mono())
    assert image.min() == 0
    assert image.max() == 255
    assert image[0, 0] == 0
    assert image[0, 3] == 255


def test_monochrome1_is_inverted():
    frame = np.array([[0, 100, 200]], dtype=np.int16)
    normal = rendering.display_image(frame, _mono("MONOCHROME2"), Window(100.5, 201))
    inverted = rendering.display_image(frame, _mono("MONOCHROME1"), Window(100.5, 201))
    assert inverted.tolist() == (255 - normal).tolist() == [[255, 127, 0]]


def test_rgb_passes_through_and_deep_colour_is_scaled():
    rgb = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(rendering.display_image(rgb, _mono("RGB")), rgb)
    deep = np.full((1, 1, 3), 65535, dtype=np.uint16)
    assert rendering.display_image(deep, _mono("RGB")).tolist() == [[[255, 255, 255]]]


# -- scaling and encoding --------------------------------------------------------------


def test_viewport_scales_down_keeping_aspect_and_never_up():
    assert rendering.fit((512, 256), (128, 128)) == (128, 64)
    assert rendering.fit((256, 512), (128, 1000)) == (128, 256)
    assert rendering.fit((64, 32), (512, 512)) == (64, 32)
    assert rendering.fit((64, 32), None) == (64, 32)


def test_png_decodes_to_the_right_size_and_is_lossless():
    image = (np.arange(20 * 30) % 256).astype(np.uint8).reshape(20, 30)
    data = rendering.encode(image)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert decoded.size == (30, 20)  # width, height
    assert np.array_equal(np.asarray(decoded), image)


def test_jpeg_with_quality_and_viewport():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, size=(200, 400, 3), dtype=np.uint8)
    small = rendering.encode(image, "image/jpeg", viewport=(100, 100), quality=10)
    better = rendering.encode(image, "image/jpeg", viewport=(100, 100), quality=95)
    decoded = Image.open(io.BytesIO(small))
    assert decoded.format == "JPEG"
    assert decoded.size == (100, 50)
    assert len(small) < len(better)


# -- decoding real files ------------------------------------------------------------


def test_frames_are_read_from_a_file_one_at_a_time():
    with bundled("SC_rgb_rle_2frame.dcm").open("rb") as source:
        first, attributes = rendering.read_frame(source, 0)
        second, _ = rendering.read_frame(source, 1)
    whole = pydicom.dcmread(bundled("SC_rgb_rle_2frame.dcm")).pixel_array
    assert first.shape == (100, 100, 3)
    assert np.array_equal(first, whole[0])
    assert np.array_equal(second, whole[1])
    assert attributes.PhotometricInterpretation == "RGB"


def test_a_ct_renders_with_its_rescale():
    with bundled("CT_small.dcm").open("rb") as source:
        frame, attributes = rendering.read_frame(source, 0)
    assert "RescaleIntercept" in attributes
    png = rendering.render(frame, attributes, window=Window(40, 400), viewport=(64, 64))
    assert Image.open(io.BytesIO(png)).size == (64, 64)


def test_frame_bytes_are_little_endian():
    frame = np.array([[1, 256]], dtype=">u2")
    assert rendering.frame_bytes(frame) == b"\x01\x00\x00\x01"


def test_undecodable_syntax_is_refused_up_front_and_bad_data_is_not_a_crash():
    rendering.check_decodable(ExplicitVRLittleEndian)
    with pytest.raises(UndecodablePixels) as raised:
        rendering.check_decodable(JPEGLSLossless)
    assert raised.value.status == 406
    assert "JPEG-LS" in raised.value.message
    with pytest.raises(UndecodablePixels):
        rendering.check_decodable("1.2.3.4.5")  # a private or unknown transfer syntax
    with pytest.raises(UndecodablePixels):
        rendering.read_frame(io.BytesIO(b"\0" * 128 + b"DICM" + b"\xff" * 64), 0)
