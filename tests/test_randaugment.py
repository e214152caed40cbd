"""RandomAugment: every op against a naive numpy reference, RNG draw order, N/M/augs behaviour."""
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from dataset import randaugment as ra
from dataset.randaugment import OPS, RandomAugment


def rand_img(seed, h=37, w=53, c=3, lo=0, hi=256):
    return np.random.RandomState(seed).randint(lo, hi, size=(h, w, c)).astype(np.uint8)


def smooth_img(seed, h=40, w=56):
    """A smooth image (low-frequency content) so bilinear references agree to within rounding."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for _ in range(3):
        a, b, c, d = rs.uniform(0.05, 0.25, 4)
        chans.append(127 + 60 * np.sin(a * xx + b * yy + rs.uniform(0, 6)) + 50 * np.cos(c * xx - d * yy))
    return np.clip(np.stack(chans, 2), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Naive references (loops / plain numpy, written from the original's formulas)
# ----------------------------------------------------------------------------------------------------------------
def ref_autocontrast(img):
    out = img.copy()
    for k in range(img.shape[2]):
        ch = img[..., k].astype(np.int64)
        lo, hi = int(ch.min()), int(ch.max())
        if hi <= lo:
            continue
        table = [min(max((v - lo) * 255 / (hi - lo), 0), 255) for v in range(256)]
        out[..., k] = np.array([int(t) for t in table], dtype=np.uint8)[ch]
    return out


def ref_equalize(img):
    out = img.copy()
    for k in range(img.shape[2]):
        ch = img[..., k]
        hist = [int((ch == v).sum()) for v in range(256)]
        nz = [h for h in hist if h]
        step = sum(nz[:-1]) // 255
        if step == 0:
            continue
        n = [step // 2] + hist[:-1]
        acc, table = 0, []
        for v in range(256):
            acc += n[v]
            table.append(min(max(acc // step, 0), 255))
        out[..., k] = np.array(table, dtype=np.uint8)[ch]
    return out


def ref_brightness(img, factor):
    f = np.float32(factor)
    table = [int(min(max(np.float32(v) * f, 0), 255)) for v in range(256)]
    return np.array(table, dtype=np.uint8)[img]


def ref_sharpness(img, factor):
    h, w, c = img.shape
    p = np.pad(img.astype(np.int64), ((1, 1), (1, 1), (0, 0)), mode='reflect')  # = OpenCV BORDER_REFLECT_101
    s = sum(p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) + 4 * img.astype(np.int64)
    deg = np.floor(s / 13 + 0.5).astype(np.uint8)  # s/13 is never within 1/26 of a .5 tie
    if factor == 0:
        return deg
    if factor == 1:
        return img
    out = img.copy()
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            for k in range(c):
                d = np.float32(deg[y, x, k])
                v = d + np.float32(factor) * (np.float32(img[y, x, k]) - d)
                out[y, x, k] = int(math.trunc(float(v))) % 256  # no clipping: truncate, wrap modulo 256
    return out


def ref_warp(img, fwd, fill=128):
    """Bilinear inverse mapping of a forward 2x3 affine matrix, out-of-image samples = fill.

    Source coordinates are quantised to 1/32 pixel as OpenCV's fixed-point warpAffine does.
    """
    h, w, c = img.shape
    a = np.vstack([np.asarray(fwd, dtype=np.float64), [0, 0, 1]])
    inv = np.linalg.inv(a)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    sx, sy = np.round(sx * 32) / 32, np.round(sy * 32) / 32
    sx, sy = np.clip(sx, -3, w + 2), np.clip(sy, -3, h + 2)
    pad = 4
    p = np.pad(img.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    g = lambda yi, xi: p[yi + pad, xi + pad]  # noqa: E731
    v = (g(y0, x0) * (1 - fx) * (1 - fy) + g(y0, x0 + 1) * fx * (1 - fy)
         + g(y0 + 1, x0) * (1 - fx) * fy + g(y0 + 1, x0 + 1) * fx * fy)
    return np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8)


def assert_warp_close(out, ref):
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert (diff > 1).mean() < 0.01, f'{(diff > 1).mean():.4f} of pixels differ by more than 1'
    assert diff.max() <= 8


# ----------------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('seed', range(4))
def test_autocontrast_matches_reference(seed):
    img = rand_img(seed, lo=20 + seed * 10, hi=200 - seed * 20)  # channel min > 0 and max < 255
    img[..., 1] = 77                                             # a flat channel stays unchanged
    out = ra.auto_contrast(img)
    np.testing.assert_array_equal(out, ref_autocontrast(img))
    assert (out[..., 1] == 77).all() and out[..., 0].min() == 0 and out[..., 0].max() == 255
    # PIL computes the same map in a slightly different float order: at most 1 apart.
    pil = np.asarray(ImageOps.autocontrast(Image.fromarray(img)))
    assert np.abs(pil.astype(int) - out.astype(int)).max() <= 1


@pytest.mark.parametrize('seed', range(4))
def test_equalize_is_pil_style(seed):
    img = rand_img(seed, h=31, w=29, lo=0, hi=60 + 40 * seed)
    img[:3, :3, 2] = 255
    out = ra.equalize(img)
    np.testing.assert_array_equal(out, ref_equalize(img))
    np.testing.assert_array_equal(out, np.asarray(ImageOps.equalize(Image.fromarray(img))))


def test_equalize_step_zero_leaves_channel():
    img = np.full((10, 10, 3), 9, np.uint8)
    img[0, 0, 0] = 200  # 1 pixel outside the last bin -> step 0
    np.testing.assert_array_equal(ra.equalize(img), img)


@pytest.mark.parametrize('factor', [0.1, 0.73, 1.36, 1.9])
def test_brightness_matches_reference(factor):
    img = rand_img(1)
    np.testing.assert_array_equal(ra.brightness(img, factor), ref_brightness(img, factor))


@pytest.mark.parametrize('factor', [0.0, 1.0, 0.37, 1.36, 1.9])
def test_sharpness_interior_only_no_clip(factor):
    img = rand_img(2, h=12, w=15)
    out = ra.sharpness(img, factor)
    np.testing.assert_array_equal(out, ref_sharpness(img, factor))
    if factor not in (0.0, 1.0):
        np.testing.assert_array_equal(out[0], img[0])
        np.testing.assert_array_equal(out[:, -1], img[:, -1])


def test_sharpness_wraps_instead_of_clipping():
    img = np.zeros((5, 5, 3), np.uint8)
    img[2, 2] = 255  # centre much brighter than its neighbourhood: 1.9 * (255 - 98) + 98 > 255
    out = ra.sharpness(img, 1.9)
    deg = np.float32(98)  # round(5 * 255 / 13)
    expected = int(deg + np.float32(1.9) * (np.float32(255) - deg)) % 256
    assert out[2, 2, 0] == expected and expected < 255


@pytest.mark.parametrize('s', [0.21, -0.21, 0.3])
def test_shear_geometry(s):
    img = smooth_img(3)
    assert_warp_close(ra.shear_x(img, s, ra.FILL), ref_warp(img, [[1, s, 0], [0, 1, 0]]))
    assert_warp_close(ra.shear_y(img, s, ra.FILL), ref_warp(img, [[1, 0, 0], [s, 1, 0]]))


@pytest.mark.parametrize('offset', [7.0, -7.0, 2.5])
def test_translate_geometry(offset):
    img = smooth_img(4)
    assert_warp_close(ra.translate_x(img, offset, ra.FILL), ref_warp(img, [[1, 0, -offset], [0, 1, 0]]))
    assert_warp_close(ra.translate_y(img, offset, ra.FILL), ref_warp(img, [[1, 0, 0], [0, 1, -offset]]))


def test_translate_integer_is_exact_shift_with_fill_128():
    img = rand_img(5)
    out = ra.translate_x(img, 7.0, ra.FILL)   # content moves left by 7
    np.testing.assert_array_equal(out[:, :-7], img[:, 7:])
    assert (out[:, -7:] == 128).all()
    out = ra.translate_y(img, -7.0, ra.FILL)  # content moves down by 7
    np.testing.assert_array_equal(out[7:], img[:-7])
    assert (out[:7] == 128).all()


@pytest.mark.parametrize('angle', [21.0, -21.0, 90.0])
def test_rotate_geometry(angle):
    img = smooth_img(6, h=41, w=47)
    h, w = img.shape[:2]
    cx, cy = w / 2, h / 2
    a, b = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    fwd = [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]]
    assert_warp_close(ra.rotate(img, angle, ra.FILL), ref_warp(img, fwd))


def test_rotate_positive_is_counter_clockwise():
    img = np.zeros((41, 41, 3), np.uint8)
    img[20, 30:35] = 255                      # a bar to the right of the centre
    out = ra.rotate(img, 90.0, ra.FILL)
    ys, xs = np.nonzero(out[..., 0] > 200)
    assert ys.mean() < 15 and abs(xs.mean() - 20.5) < 2  # now above the centre
    assert out[0, 0, 0] == 128                # corners come from outside: fill colour


def test_unused_ops_match_formulas():
    img = rand_img(7)
    v = np.arange(256)
    np.testing.assert_array_equal(ra.solarize(img, 179), np.where(v < 179, v, 255 - v).astype(np.uint8)[img])
    np.testing.assert_array_equal(ra.posterize(img, 2), img & 0b11000000)
    np.testing.assert_array_equal(ra.posterize(img, 4), img & 0b11110000)
    w = np.array([0.114, 0.587, 0.299])
    f = 1.36
    grey = (img.astype(np.float64) * w).sum(2, keepdims=True)
    color_ref = np.clip(grey + f * (img - grey), 0, 255)
    assert np.abs(ra.color(img, f).astype(int) - color_ref.astype(np.uint8).astype(int)).max() <= 1
    mean = (img.reshape(-1, 3).mean(0) * w).sum()
    contrast_ref = np.clip((v - mean) * f + mean, 0, 255).astype(np.uint8)[img]
    np.testing.assert_array_equal(ra.contrast(img, f), contrast_ref)
    assert ra.identity(img) is img


def test_ops_accept_grayscale_arrays():
    img = rand_img(8)[..., 0]
    for name, op in OPS.items():
        if name in ('Color', 'Contrast'):
            continue
        args = op.level_to_args(7)
        out = op.func(img, *args)
        assert out.shape == img.shape and out.dtype == np.uint8, name


# ----------------------------------------------------------------------------------------------------------------
# Arguments, RNG order, N / M / augs
# ----------------------------------------------------------------------------------------------------------------
def test_level_to_args_at_m7():
    assert OPS['Brightness'].level_to_args(7) == pytest.approx((1.36,))
    assert OPS['Sharpness'].level_to_args(7) == pytest.approx((1.36,))
    assert OPS['Solarize'].level_to_args(7) == (179,)
    assert OPS['Posterize'].level_to_args(7) == (2,)
    for name, mag, negate_when in [('Rotate', 21.0, 'lt'), ('ShearX', 0.21, 'gt'), ('ShearY', 0.21, 'gt'),
                                   ('TranslateX', 7.0, 'gt'), ('TranslateY', 7.0, 'gt')]:
        for seed in range(6):
            np.random.seed(seed)
            r = np.random.random()
            np.random.seed(seed)
            value, fill = OPS[name].level_to_args(7)
            negate = r < 0.5 if negate_when == 'lt' else r > 0.5
            assert value == pytest.approx(-mag if negate else mag) and fill == (128, 128, 128), (name, seed)


def _replay(img, augs, N, M):
    """Apply RandomAugment by hand, drawing from np.random in the documented order."""
    names = np.random.choice(augs, N)
    for name in names:
        if np.random.random() > 0.5:
            continue
        args = ()
        if name == 'Rotate':
            angle = M / 10 * 30
            args = (-angle if np.random.random() < 0.5 else angle, (128, 128, 128))
        elif name in ('ShearX', 'ShearY', 'TranslateX', 'TranslateY'):
            mag = M / 10 * (0.3 if name.startswith('Shear') else 10.0)
            args = (-mag if np.random.random() > 0.5 else mag, (128, 128, 128))
        elif name in ('Brightness', 'Sharpness', 'Color', 'Contrast'):
            args = (M / 10 * 1.8 + 0.1,)
        elif name == 'Solarize':
            args = (int(M / 10 * 256),)
        elif name == 'Posterize':
            args = (int(M / 10 * 4),)
        img = OPS[str(name)].func(img, *args)
    return img


@pytest.mark.parametrize('seed', range(12))
def test_rng_consumption_order_and_output(seed):
    img = rand_img(seed, h=24, w=28)
    aug = RandomAugment(3, 7, augs=list(ra.DEFAULT_AUGS))
    np.random.seed(seed)
    out = aug(img)
    after = np.random.random()
    np.random.seed(seed)
    expected = _replay(img, list(ra.DEFAULT_AUGS), 3, 7)
    np.testing.assert_array_equal(out, expected)
    assert np.random.random() == after  # same number of draws


def test_empty_augs_means_all_14_in_spec_order():
    assert RandomAugment().augs == ['Identity', 'AutoContrast', 'Equalize', 'Rotate', 'Solarize', 'Color',
                                    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
                                    'TranslateY', 'Posterize']
    img = rand_img(0, h=16, w=16)
    for seed in range(8):
        np.random.seed(seed)
        out = RandomAugment(2, 10)(img)
        np.random.seed(seed)
        np.testing.assert_array_equal(out, _replay(img, list(OPS), 2, 10))


def test_n_zero_and_identity_leave_image():
    img = rand_img(1)
    np.random.seed(0)
    assert RandomAugment(0, 7)(img) is img
    np.testing.assert_array_equal(RandomAugment(4, 7, augs=['Identity'])(img), img)


def test_each_op_applies_with_probability_half():
    img = rand_img(2)
    aug = RandomAugment(1, 7, augs=['Brightness'])
    bright = ra.brightness(img, 1.36)
    np.random.seed(123)
    applied = sum(np.array_equal(aug(img), bright) for _ in range(400))
    assert 160 < applied < 240


def test_m_sets_magnitude():
    img = rand_img(3)
    for m in (0, 3, 10):
        aug = RandomAugment(1, m, augs=['Brightness'])
        for seed in range(20):
            np.random.seed(seed)
            out = aug(img)
            if not np.array_equal(out, img):
                np.testing.assert_array_equal(out, ra.brightness(img, m / 10 * 1.8 + 0.1))
                break


def test_pil_input_and_type_errors():
    img = rand_img(4)
    np.random.seed(1)
    out = RandomAugment(2, 7, isPIL=True, augs=['AutoContrast'])(Image.fromarray(img))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == img.shape
    with pytest.raises(TypeError, match='isPIL=True'):
        RandomAugment(2, 7)(Image.fromarray(img))


def test_unknown_op_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown op 'Blur'.*known ops: Identity"):
        RandomAugment(2, 7, augs=['Identity', 'Blur'])
    with pytest.raises(ValueError, match='N must be'):
        RandomAugment(-1, 7)
