"""Batches from schedules: every image mode decodes right, batches match their buckets and concepts,
augmentation is reproducible, resumed loaders skip batches, cached latents are encoded once.

Images are written in code; the tokenizer is the tiny CLIP one from edtools.models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edtools.balance.schedule import build_epoch, shard  # noqa: E402
from edtools.config import TrainConfig  # noqa: E402
from edtools.data import LatentCache, LatentStore, ScheduleBatches, load_image, make_loader  # noqa: E402
from edtools.dataset.scan import load_dataset  # noqa: E402

BUCKETS = ((64, 64), (96, 48))
# 72x64 lands in the 64x64 bucket and 100x48 in 96x48: both leave room for a random crop.
SIZES = ((72, 64), (100, 48))
W, H = 32, 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from edtools.models import tiny_tokenizer

    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def vae():
    from edtools.models import tiny_components

    return tiny_components(seed=0).vae


def as_uint8(tensor: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [-1,1] -> HxWx3 0..255 floats."""
    return ((tensor.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float64)


def halves(left, right, mode: str) -> Image.Image:
    image = Image.new(mode, (W, H), left)
    image.paste(right, (W // 2, 0, W, H))
    return image


def expected_halves(left, right) -> np.ndarray:
    out = np.empty((H, W, 3))
    out[:, : W // 2] = left
    out[:, W // 2 :] = right
    return out


WHITE = (255, 255, 255)


def rgb_noise(path: Path):
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path.with_suffix(".png"))
    return path.with_suffix(".png"), pixels.astype(np.float64), 0


def rgba(path: Path):
    image = halves((10, 200, 30, 255), (0, 0, 0, 0), "RGBA")
    image.save(path.with_suffix(".png"))
    return path.with_suffix(".png"), expected_halves((10, 200, 30), WHITE), 0


def rgba_half_transparent(path: Path):
    Image.new("RGBA", (W, H), (0, 0, 0, 128)).save(path.with_suffix(".png"))
    grey = 255 * (1 - 128 / 255)
    return path.with_suffix(".png"), np.full((H, W, 3), grey), 1


def palette_with_transparency(path: Path):
    image = halves(1, 0, "P")
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.save(path.with_suffix(".png"), transparency=0)
    return path.with_suffix(".png"), expected_halves((200, 100, 50), WHITE), 0


def palette(path: Path):
    image = halves(1, 0, "P")
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.save(path.with_suffix(".png"))
    return path.with_suffix(".png"), expected_halves((200, 100, 50), (10, 20, 30)), 0


def cmyk_jpeg(path: Path):
    halves((255, 0, 0, 0), (0, 0, 0, 255), "CMYK").save(path.with_suffix(".jpg"), quality=95)
    return path.with_suffix(".jpg"), expected_halves((0, 255, 255), (0, 0, 0)), 40  # JPEG edge ringing


def grey(path: Path):
    values = np.tile(np.linspace(0, 255, W).round().astype(np.uint8), (H, 1))
    Image.fromarray(values, mode="L").save(path.with_suffix(".png"))
    return path.with_suffix(".png"), np.repeat(values[..., None], 3, axis=2).astype(np.float64), 0


def grey_alpha(path: Path):
    halves((50, 255), (0, 0), "LA").save(path.with_suffix(".png"))
    return path.with_suffix(".png"), expected_halves((50, 50, 50), WHITE), 0


def bilevel(path: Path):
    halves(1, 0, "1").save(path.with_suffix(".png"))
    return path.with_suffix(".png"), expected_halves(WHITE, (0, 0, 0)), 0


def grey_16bit(path: Path):
    values = np.tile(np.array([0, 30000, 65535] * (W // 3) + [65535] * (W % 3), dtype=np.uint16), (H, 1))
    Image.fromarray(values).save(path.with_suffix(".png"))  # mode I;16
    expected = np.round(values.astype(np.float64) / 257)  # 30000 -> 117, not clipped to 255
    return path.with_suffix(".png"), np.repeat(expected[..., None], 3, axis=2), 0


def grey_32bit_int(path: Path):
    Image.new("I", (W, H), 30000).save(path.with_suffix(".tiff"))
    return path.with_suffix(".tiff"), np.full((H, W, 3), 117.0), 0


@pytest.mark.parametrize(
    "write, mode",
    [
        (rgb_noise, "RGB"),
        (rgba, "RGBA"),
        (rgba_half_transparent, "RGBA"),
        (palette_with_transparency, "P"),
        (palette, "P"),
        (cmyk_jpeg, "CMYK"),
        (grey, "L"),
        (grey_alpha, "LA"),
        (bilevel, "1"),
        (grey_16bit, "I;16"),
        (grey_32bit_int, "I"),
    ],
    ids=lambda v: v.__name__ if callable(v) else v,
)
def test_every_image_mode_loads_as_rgb(tmp_path, write, mode):
    path, expected, tolerance = write(tmp_path / "image")
    with Image.open(path) as image:
        assert image.mode == mode  # the file really is of the mode under test
    pixels = load_image(path, W, H)
    assert pixels.shape == (3, H, W) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    np.testing.assert_allclose(as_uint8(pixels), expected, atol=tolerance + 1e-3)


def write_two_colour_jpeg(path: Path, size: tuple[int, int], orientation: int) -> Path:
    """Left half red, right half blue as stored; orientation tells viewers how to turn it."""
    image = halves((255, 0, 0), (0, 0, 255), "RGB").resize(size, Image.Resampling.NEAREST)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)
    return path


def test_exif_rotated_jpeg_is_upright(tmp_path):
    # Orientation 6: turn 90 degrees clockwise to view, so the stored left (red) becomes the top.
    path = write_two_colour_jpeg(tmp_path / "rotated.jpg", (40, 20), orientation=6)
    pixels = as_uint8(load_image(path, 20, 40))
    assert pixels.shape == (40, 20, 3)
    top, bottom = pixels[:16].mean(axis=(0, 1)), pixels[24:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50

    from edtools.dataset.imageheader import image_size as _image_size

    assert _image_size(path) == (20, 40)  # the scan sees the same upright size


@pytest.mark.parametrize(
    "orientation, target, decoded",
    [
        (1, (64, 48), (256, 192)),  # 1/8 scale still covers 64x48
        (6, (48, 64), (256, 192)),
        # Upright the photo is 1536x2048; covering 256 px wide needs 341 px of stored height: 1/4 scale.
        (6, (256, 100), (512, 384)),
    ],
)
def test_large_jpeg_is_decoded_small_with_draft(tmp_path, monkeypatch, orientation, target, decoded):
    from PIL import JpegImagePlugin

    size = (2048, 1536)
    x = np.linspace(0, 1, size[0])[None, :, None]
    y = np.linspace(0, 1, size[1])[:, None, None]
    smooth = (np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2) * 255).astype(np.uint8)
    image = Image.fromarray(smooth)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "large.jpg"
    image.save(path, quality=95, exif=exif)

    decoded_sizes = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, requested):
        result = original_draft(self, mode, requested)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    width, height = target
    pixels = load_image(path, width, height)
    assert decoded_sizes == [decoded]
    assert pixels.shape == (3, height, width)

    with Image.open(path) as full:
        full.load()
        upright = ImageOps.exif_transpose(full)
        scale = max(width / upright.width, height / upright.height)
        cover = (round(upright.width * scale), round(upright.height * scale))
        left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
        reference = upright.resize(cover, Image.Resampling.LANCZOS).crop(
            (left, top, left + width, top + height)
        )
    difference = np.abs(as_uint8(pixels) - np.asarray(reference, dtype=np.float64))
    assert difference.mean() < 3


def test_resize_covers_and_crops(tmp_path):
    path = rgb_noise(tmp_path / "noise")[0]  # 32x16
    centre = load_image(path, 16, 16)
    assert torch.equal(centre, load_image(path, 32, 16)[:, :, 8:24])
    crops = {
        tuple(
            load_image(path, 16, 16, center_crop=False, crop_rng=np.random.default_rng(s))[0, 0, :3].tolist()
        )
        for s in range(20)
    }
    assert len(crops) > 3  # random crops move
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    a = load_image(path, 16, 16, center_crop=False, crop_rng=rng_a)
    assert torch.equal(a, load_image(path, 16, 16, center_crop=False, crop_rng=rng_b))
    assert torch.equal(load_image(path, 32, 16, flip=True), load_image(path, 32, 16).flip(-1))
    upscaled = load_image(path, 64, 64)  # smaller images are scaled up to cover
    assert upscaled.shape == (3, 64, 64)


def test_load_image_errors_name_the_problem(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(broken, 8, 8)
    path = rgb_noise(tmp_path / "ok")[0]
    with pytest.raises(ValueError, match="crop_rng"):
        load_image(path, 8, 8, center_crop=False)
    with pytest.raises(ValueError, match="positive"):
        load_image(path, 0, 8)


# --- batches --------------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tree):
    root = tree({"people/a": 5, "style": 3}, sizes=SIZES)
    (root / "style" / "loss_scale.txt").write_text("2.5")
    return load_dataset(root)


def epoch_batches(dataset, tokenizer, epoch=0, **kwargs) -> ScheduleBatches:
    schedule = build_epoch(dataset, epoch=epoch, seed=3, batch_size=2, buckets=BUCKETS)
    return ScheduleBatches(dataset, schedule, tokenizer, **kwargs)


def test_batches_match_schedule_buckets_and_concepts(dataset, tokenizer):
    batches = epoch_batches(dataset, tokenizer)
    schedule = batches.schedule
    assert len(batches) == schedule.n_batches
    seen_buckets = set()
    for b in range(len(batches)):
        batch = batches[b]
        images = schedule.batch(b)
        width, height = schedule.buckets[schedule.batch_bucket[b]]
        seen_buckets.add((width, height))
        n = len(images)
        assert batch["pixel_values"].shape == (n, 3, height, width)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["image_index"].tolist() == images.tolist()
        assert batch["concept"].dtype == torch.int64
        assert batch["concept"].tolist() == dataset.concept_index[images].tolist()
        expected_scales = [dataset.concepts[c].loss_scale for c in batch["concept"].tolist()]
        assert batch["loss_scale"].dtype == torch.float32
        assert batch["loss_scale"].tolist() == expected_scales
        assert batch["input_ids"].shape == (n, tokenizer.model_max_length)
        assert batch["input_ids"].dtype == torch.int64
        captions = [dataset.captions[i] for i in images]
        assert batch["input_ids"].tolist() == tokenizer(captions, padding="max_length").input_ids
        assert (batch["batch_weight"], batch["epoch"], batch["batch"]) == (1.0, 0, b)
        for row, i in enumerate(images):  # the right file, centre-cropped to the bucket
            reference = load_image(dataset.root / dataset.paths[i], width, height)
            assert torch.equal(batch["pixel_values"][row], reference)
    assert seen_buckets == set(BUCKETS)
    assert {c.path: c.loss_scale for c in dataset.concepts} == {"people/a": 1.0, "style": 2.5}
    with pytest.raises(IndexError):
        batches[len(batches)]


def test_filler_batch_has_weight_zero(dataset, tokenizer):
    schedule = build_epoch(dataset, epoch=0, seed=3, batch_size=2, buckets=BUCKETS)
    assert schedule.n_batches % 2 == 1  # 5 + 3 images in two buckets, batches of 2 -> odd count
    rank_1 = ScheduleBatches(dataset, shard(schedule, 1, 2), tokenizer)
    weights = [rank_1[b]["batch_weight"] for b in range(len(rank_1))]
    assert weights[:-1] == [1.0] * (len(weights) - 1) and weights[-1] == 0.0


def test_random_augmentation_is_reproducible(dataset, tokenizer):
    random_kwargs = {"center_crop": False, "flip_p": 0.5, "seed": 11}
    first = epoch_batches(dataset, tokenizer, **random_kwargs)
    again = epoch_batches(dataset, tokenizer, **random_kwargs)
    other_seed = epoch_batches(dataset, tokenizer, center_crop=False, flip_p=0.5, seed=12)
    centred = epoch_batches(dataset, tokenizer)
    differs_from_centre = differs_by_seed = False
    for b in range(len(first)):
        pixels = first[b]["pixel_values"]
        assert torch.equal(pixels, again[b]["pixel_values"])  # a resumed run sees identical pixels
        differs_from_centre |= not torch.equal(pixels, centred[b]["pixel_values"])
        differs_by_seed |= not torch.equal(pixels, other_seed[b]["pixel_values"])
    assert differs_from_centre and differs_by_seed
    # Reading batches in another order (as a resume does) changes nothing.
    assert torch.equal(
        epoch_batches(dataset, tokenizer, **random_kwargs)[3]["pixel_values"], first[3]["pixel_values"]
    )


def test_flip_p_one_mirrors_every_image(dataset, tokenizer):
    flipped = epoch_batches(dataset, tokenizer, flip_p=1.0)
    plain = epoch_batches(dataset, tokenizer)
    for b in range(len(plain)):
        assert torch.equal(flipped[b]["pixel_values"], plain[b]["pixel_values"].flip(-1))


def test_bad_batch_arguments(dataset, tokenizer):
    with pytest.raises(ValueError, match="flip_p"):
        epoch_batches(dataset, tokenizer, flip_p=1.5)
    with pytest.raises(ValueError, match="seed"):
        epoch_batches(dataset, tokenizer, seed=-1)


class CountingBatches(ScheduleBatches):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded: list[int] = []

    def __getitem__(self, b):
        self.loaded.append(b)
        return super().__getitem__(b)


def test_loader_start_batch_skips_without_loading(dataset, tokenizer):
    schedule = build_epoch(dataset, epoch=0, seed=3, batch_size=2, buckets=BUCKETS)
    batches = CountingBatches(dataset, schedule, tokenizer)
    n = len(batches)
    got = list(make_loader(batches, start_batch=2))
    assert batches.loaded == list(range(2, n))
    assert [batch["batch"] for batch in got] == list(range(2, n))
    reference = ScheduleBatches(dataset, schedule, tokenizer)
    for batch in got:
        assert torch.equal(batch["pixel_values"], reference[batch["batch"]]["pixel_values"])
        assert batch["batch_weight"] == 1.0 and isinstance(batch["epoch"], int)
    assert list(make_loader(batches, start_batch=n)) == []
    with pytest.raises(ValueError, match="start_batch"):
        make_loader(batches, start_batch=n + 1)
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(batches, num_workers=-1)


def test_loader_with_workers_keeps_schedule_order(dataset, tokenizer):
    batches = epoch_batches(dataset, tokenizer, center_crop=False, flip_p=0.5)
    in_process = list(make_loader(batches, start_batch=1))
    with_workers = list(make_loader(batches, start_batch=1, num_workers=2))
    assert [b["batch"] for b in with_workers] == list(range(1, len(batches)))
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])


# --- latents --------------------------------------------------------------------------------------------


def count_encodes(vae, monkeypatch) -> list[int]:
    """Rows passed to vae.encode, one entry per call."""
    rows: list[int] = []
    original = vae.encode

    def counting(pixels, *args, **kwargs):
        rows.append(pixels.shape[0])
        return original(pixels, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting)
    return rows


def test_latent_cache_encodes_each_image_once(dataset, tokenizer, vae, monkeypatch):
    scaling = 0.18215
    epoch_0 = epoch_batches(dataset, tokenizer, epoch=0, latent_keys=True)
    epoch_1 = epoch_batches(dataset, tokenizer, epoch=1, latent_keys=True)
    fresh = {}
    for b in range(len(epoch_0)):
        batch = epoch_0[b]
        with torch.no_grad():  # one image at a time, as the cache encodes
            rows = [vae.encode(p[None]).latent_dist.mode()[0] for p in batch["pixel_values"]]
        fresh[b] = torch.stack(rows) * scaling

    rows = count_encodes(vae, monkeypatch)
    cache = LatentCache(LatentStore("memory"))
    for b in range(len(epoch_0)):
        latents = cache.latents(epoch_0[b], vae, scaling)
        assert latents.shape == fresh[b].shape
        torch.testing.assert_close(latents, fresh[b])
    assert sum(rows) == len(dataset) == len(cache)  # multiplier 1: every image once in epoch 0
    assert set(rows) == {1}  # one image per encode: the VAE's peak is one image's, at any batch size
    calls_after_epoch_0 = len(rows)
    for b in range(len(epoch_1)):
        cache.latents(epoch_1[b], vae, scaling)
    assert len(rows) == calls_after_epoch_0  # epoch 1 reuses every latent


def test_every_crop_and_flip_is_its_own_entry_and_a_store_skips_decoding(
    dataset, tokenizer, vae, monkeypatch
):
    import edtools.data.batches as data_module  # where ScheduleBatches looks decode_image up

    store = LatentStore("memory")
    cache = LatentCache(store)
    random = dict(center_crop=False, flip_p=0.5, seed=11, latent_keys=True)
    for b in range(len(epoch_batches(dataset, tokenizer, **random))):
        cache.latents(epoch_batches(dataset, tokenizer, **random)[b], vae, 1.0)
    entries = len(store)
    assert entries == len(dataset)
    other_epoch = epoch_batches(dataset, tokenizer, epoch=1, **random)
    decoded = []
    real_decode = data_module.decode_image
    monkeypatch.setattr(data_module, "decode_image", lambda *a: decoded.append(a) or real_decode(*a))
    stored = epoch_batches(dataset, tokenizer, epoch=1, latent_store=store, **random)
    keys_1 = [k for b in range(len(other_epoch)) for k in other_epoch[b]["latent_keys"]]
    new_keys = set(keys_1) - {k for k in store._memory}
    decoded.clear()
    for b in range(len(stored)):
        batch = stored[b]
        assert batch["pixel_values"].shape[0] == sum(latent is None for latent in batch["cached_latents"])
        cache.latents(batch, vae, 1.0)
    assert len(decoded) == len(new_keys) > 0  # only crops not seen before were decoded
    assert len(store) == entries + len(new_keys)


def test_disk_store_is_reused_across_runs_and_keyed_by_file_crop_and_vae(tmp_path, tree, tokenizer, vae):
    from edtools.data import latent_key, plan_crop, vae_key

    root = tree({"a": 2})
    dataset = load_dataset(root)
    folder = tmp_path / "cache"
    store = LatentStore("disk", folder, vae_key(vae))
    first = epoch_batches(dataset, tokenizer, latent_store=store)
    made = [LatentCache(store).latents(first[b], vae, 1.0) for b in range(len(first))]
    files = sorted(folder.rglob("*.safetensors"))
    assert len(files) == 2 and all(f.stat().st_mode & 0o777 != 0o600 for f in files)
    again = LatentStore("disk", folder, vae_key(vae))  # a later run
    second = epoch_batches(dataset, tokenizer, latent_store=again)
    for b in range(len(second)):
        batch = second[b]
        assert batch["pixel_values"].shape[0] == 0  # nothing decoded: every image came from the disk
        assert torch.equal(LatentCache(again).latents(batch, vae, 1.0), made[b])
    crop = plan_crop(64, 64, 64, 64)
    key = latent_key(root, dataset.paths[0], crop)
    assert key != latent_key(root, dataset.paths[0], plan_crop(64, 64, 64, 64, flip=True))
    (root / dataset.paths[0]).write_bytes((root / dataset.paths[1]).read_bytes() + b"\0")  # the file changed
    assert latent_key(root, dataset.paths[0], crop) != key
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # another VAE: another folder
    assert LatentStore("disk", folder, vae_key(vae)).folder != again.folder
    files[0].write_bytes(b"torn")  # a damaged entry is encoded again, not trusted
    assert again.get(files[0].stem) is None


def test_latent_cache_disabled_samples_every_time(vae, monkeypatch):
    rows = count_encodes(vae, monkeypatch)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "image_index": torch.tensor([0, 1])}
    cache = LatentCache(None)
    a = cache.latents(batch, vae, 0.5, generator=torch.Generator().manual_seed(0))
    b = cache.latents(batch, vae, 0.5, generator=torch.Generator().manual_seed(0))
    c = cache.latents(batch, vae, 0.5, generator=torch.Generator().manual_seed(1))
    assert rows == [2, 2, 2] and len(cache) == 0 and not cache.enabled
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        mean = vae.encode(batch["pixel_values"]).latent_dist.mode() * 0.5
    assert not torch.equal(a, mean)  # a sample, not the mean


# --- captions: dropout and shuffled tags ---------------------------------------------------------------


def test_caption_variants_are_seeded_and_keep_the_first_tags():
    from edtools.data import caption_variant

    caption = "alice, red dress, smiling, park, sunny"
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    assert caption_variant(caption, rng(), dropout=0.0, shuffle=False, keep=0) == caption
    assert caption_variant(caption, rng(), dropout=1.0, shuffle=True, keep=1) == ""
    shuffled = [
        caption_variant(caption, np.random.default_rng(s), dropout=0, shuffle=True, keep=1) for s in range(20)
    ]
    assert all(v.startswith("alice, ") for v in shuffled)
    assert all(sorted(v.split(", ")) == sorted(caption.split(", ")) for v in shuffled)
    assert len(set(shuffled)) > 5
    assert caption_variant(caption, rng(), dropout=0, shuffle=True, keep=1) == shuffled[5]


def test_batches_drop_and_shuffle_captions_per_epoch(tree, tokenizer):
    root = tree({"a": 6})
    for i, path in enumerate(sorted((root / "a").glob("*.png"))):
        path.with_suffix(".txt").write_text(f"person {i}, red, blue, green")
    dataset = load_dataset(root)
    dropped = epoch_batches(dataset, tokenizer, caption_dropout=1.0)
    assert {c for b in range(len(dropped)) for c in dropped[b]["captions"]} == {""}
    half = [epoch_batches(dataset, tokenizer, epoch=e, caption_dropout=0.5) for e in range(4)]
    captions = [c for batches in half for b in range(len(batches)) for c in batches[b]["captions"]]
    assert 0 < captions.count("") < len(captions)
    shuffled = epoch_batches(dataset, tokenizer, shuffle_tags=True, keep_tags=1)
    again = epoch_batches(dataset, tokenizer, shuffle_tags=True, keep_tags=1)
    seen = [c for b in range(len(shuffled)) for c in shuffled[b]["captions"]]
    assert seen == [c for b in range(len(again)) for c in again[b]["captions"]]  # the same each time
    assert all(c.startswith("person ") for c in seen) and any(not c.endswith("green") for c in seen)
    tokens = shuffled[0]["input_ids"][0].tolist()
    assert tokens == tokenizer(shuffled[0]["captions"][0], padding="max_length").input_ids


def test_caption_settings_per_folder_fall_back_to_the_global_ones():
    from edtools.config import ConfigError
    from edtools.data import CaptionSetting, concept_caption_settings

    def settings(**values):
        config = TrainConfig(data_root="d", model="m", out="o", **values)
        return concept_caption_settings(config, ("a", "b", "c"))

    assert settings() == (CaptionSetting(0.0, False),) * 3
    assert settings(caption_dropout=0.1, caption_dropouts={"b": 0.5}, shuffle_tags_concepts=["c"]) == (
        CaptionSetting(0.1, False),
        CaptionSetting(0.5, False),
        CaptionSetting(0.1, True),
    )
    assert settings(shuffle_tags=True, caption_dropouts={"a": 0})[0] == CaptionSetting(0.0, True)
    with pytest.raises(ConfigError, match=r"caption_dropouts names folder\(s\) 'x' .*\(a, b, c\)"):
        settings(caption_dropouts={"x": 0.5})
    with pytest.raises(ConfigError, match="shuffle_tags_concepts names folder\\(s\\) 'B'"):
        settings(shuffle_tags_concepts=["B"])


def test_batches_drop_and_shuffle_only_the_folders_named(tree, tokenizer):
    from edtools.data import concept_caption_settings

    root = tree({"a": 6, "b": 6})
    for folder in ("a", "b"):
        for i, path in enumerate(sorted((root / folder).glob("*.png"))):
            path.with_suffix(".txt").write_text(f"{folder} {i}, red, blue, green, yellow")
    dataset = load_dataset(root)
    config = TrainConfig(
        data_root=str(root), model="m", out="o", caption_dropouts={"a": 0.5}, shuffle_tags_concepts=["a"]
    )
    settings = concept_caption_settings(config, dataset.concept_paths)

    def captions(epoch):
        batches = epoch_batches(dataset, tokenizer, epoch=epoch, caption_settings=settings)
        return [
            (int(concept), caption)
            for b in range(len(batches))
            for concept, caption in zip(batches[b]["concept"], batches[b]["captions"], strict=True)
        ]

    seen = [pair for epoch in range(4) for pair in captions(epoch)]
    assert seen == [pair for epoch in range(4) for pair in captions(epoch)]  # seeded: the same each time
    a, b = dataset.concept_paths.index("a"), dataset.concept_paths.index("b")
    of_a = [caption for concept, caption in seen if concept == a]
    of_b = [caption for concept, caption in seen if concept == b]
    assert 0 < of_a.count("") < len(of_a)  # half of a's dropped
    assert any(c and not c.endswith("yellow") for c in of_a)  # a's tags shuffled
    assert set(of_b) == set(dataset.captions[i] for i in dataset.images_of(b))  # b's intact
    with pytest.raises(ValueError, match="caption_settings has 1 entries; the dataset has 2 concepts"):
        epoch_batches(dataset, tokenizer, caption_settings=settings[:1])


# ---------------------------------------------------------------------------------------------------------
# Crop plans and SDXL's size/crop conditioning (golden values worked out by hand)


@pytest.mark.parametrize(
    ("image", "bucket", "cover", "left_top", "time_ids"),
    [
        # 3:2 photo into a 3:2 bucket: scaled down, nothing cut
        ((3000, 2000), (768, 512), (768, 512), (0, 0), (2000, 3000, 0, 0, 512, 768)),
        # portrait into a square: covers at 512x1024, the centre 512 rows kept from row 256
        ((1000, 2000), (512, 512), (512, 1024), (0, 256), (2000, 1000, 256, 0, 512, 512)),
        # landscape 4:3 into a square: 683x512 (682.67 rounded), columns from (683-512)//2 = 85
        ((800, 600), (512, 512), (683, 512), (85, 0), (600, 800, 0, 85, 512, 512)),
        # smaller than the bucket: scaled up to cover
        ((100, 50), (256, 128), (256, 128), (0, 0), (50, 100, 0, 0, 128, 256)),
    ],
)
def test_centre_crop_plans_and_time_ids(image, bucket, cover, left_top, time_ids):
    from edtools.data import plan_crop

    crop = plan_crop(*image, *bucket)
    assert (crop.cover, (crop.left, crop.top), crop.size) == (cover, left_top, bucket)
    assert crop.time_ids() == time_ids


def test_random_crop_and_flip_time_ids():
    from edtools.data import plan_crop

    crop = plan_crop(800, 600, 512, 512, center_crop=False, flip=False, rng=np.random.default_rng(3))
    left = int(np.random.default_rng(3).integers(0, 683 - 512 + 1))  # the same draw, by hand
    assert (crop.left, crop.top) == (left, 0) and crop.time_ids() == (600, 800, 0, left, 512, 512)
    flipped = plan_crop(800, 600, 512, 512, center_crop=False, flip=True, rng=np.random.default_rng(3))
    # mirrored, the kept columns start 683 - left - 512 from the left edge of the mirrored image
    assert flipped.time_ids() == (600, 800, 0, 683 - left - 512, 512, 512)
    assert plan_crop(800, 600, 512, 512, flip=True).time_ids() == (600, 800, 0, 683 - 85 - 512, 512, 512)


def test_batches_carry_each_images_time_ids_from_its_real_size(tree, tokenizer):
    from edtools.data import decode_image

    root = tree({"a": 2}, sizes=((120, 60), (60, 90)))
    dataset = load_dataset(root)
    schedule = build_epoch(dataset, epoch=0, seed=1, batch_size=1, resolution=64)
    batches = ScheduleBatches(dataset, schedule, (tokenizer, tokenizer), seed=1)
    seen = {}
    for b in range(len(batches)):
        batch = batches[b]
        (i,) = batch["image_index"].tolist()
        (crop,) = batches.crops(b)
        seen[dataset.paths[i]] = batch["time_ids"][0].tolist()
        assert batch["time_ids"][0].tolist() == list(crop.time_ids())
        assert torch.equal(batch["pixel_values"][0], decode_image(root / dataset.paths[i], crop))
        assert torch.equal(batch["input_ids"], batch["input_ids_2"]) and batch["captions"] == [
            dataset.captions[i]
        ]
    # At resolution 64 the only bucket is 64x64: 120x60 covers it at 128x64 and loses 32 columns each side,
    # 60x90 covers it at 64x96 and loses 16 rows at the top and the bottom.
    assert seen == {"a/a_000.png": [60, 120, 0, 32, 64, 64], "a/a_001.png": [90, 60, 16, 0, 64, 64]}


# ---------------------------------------------------------------------------------------------------------
# Fast decoding stays what plain PIL gives


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like pixels: 1/f noise (the spectrum of natural images) in three channels, and hard-edged blocks."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    f[0, 0] = 1.0
    planes = []
    for _ in range(3):
        plane = np.fft.irfft2(
            (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f, s=(height, width)
        )
        planes.append(plane / plane.std())
    pixels = (128 + 45 * np.stack(planes, 2)).clip(0, 255).astype(np.uint8)
    for _ in range(8):
        x, y = rng.integers(0, width - 40), rng.integers(0, height - 40)
        pixels[y : y + rng.integers(10, 200), x : x + rng.integers(10, 200)] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.8))  # a lens is never perfectly sharp


def plain_pil(path: Path, crop, *, upright: bool = False) -> np.ndarray:
    """The straightforward loader: open, (turn upright,) convert to RGB, Lanczos to the cover size, cut, flip."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image) if upright else image
        image = image.convert("RGB")
    image = image.resize(crop.cover, Image.Resampling.LANCZOS)
    image = image.crop((crop.left, crop.top, crop.left + crop.size[0], crop.top + crop.size[1]))
    if crop.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize(
    ("fmt", "orientation", "bucket", "flip", "limit"),
    [
        # The bench case, smaller (4x down): decoded at 1/2 by the JPEG decoder, Lanczos does the last 2x.
        ("JPEG", 1, (300, 200), False, 1.5),
        ("JPEG", 6, (200, 300), True, 1.5),  # EXIF-turned, mirrored
        # 3.1x down, a square bucket cutting the sides: halved, 1.56x left to Lanczos (the least allowed)
        ("JPEG", 1, (256, 256), False, 2.0),
        ("PNG", 1, (384, 256), False, 2.0),  # halved by reduce(), then the same
        ("JPEG", 1, (600, 400), False, 0.01),  # 2x down: not shrunk first, so plain PIL's pixels
        ("PNG", 1, (640, 480), False, 0.01),  # scaled up: the same pixels
    ],
)
def test_decode_is_close_to_plain_pil(tmp_path, fmt, orientation, bucket, flip, limit):
    from edtools.data import decode_image, plan_crop

    image = photo_like(1200, 800)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{fmt.lower()}"
    image.save(path, fmt, quality=92, exif=exif)
    upright = (800, 1200) if orientation in (5, 6, 7, 8) else (1200, 800)
    crop = plan_crop(*upright, *bucket, center_crop=False, flip=flip, rng=np.random.default_rng(4))
    ours = as_uint8(decode_image(path, crop)).round()
    reference = plain_pil(path, crop, upright=True)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).mean() < limit


def test_resizing_only_the_kept_region_equals_resize_then_cut():
    from edtools.data import plan_crop
    from edtools.data.images import _resize_and_cut

    image = photo_like(500, 300, seed=2)
    for bucket in ((128, 128), (96, 160), (200, 100), (512, 512)):
        for seed in range(3):
            crop = plan_crop(500, 300, *bucket, center_crop=False, rng=np.random.default_rng(seed))
            left, top, (width, height) = crop.left, crop.top, crop.size
            expected = image.resize(crop.cover, Image.Resampling.LANCZOS).crop(
                (left, top, left + width, top + height)
            )
            got = np.asarray(_resize_and_cut(image, crop), dtype=np.int16)
            difference = np.abs(got - np.asarray(expected, dtype=np.int16))
            # The same filter taps; a few pixels differ by the rounding between PIL's two passes.
            assert difference.max() <= 2 and difference.mean() < 0.05, (bucket, seed)


def test_grey_jpeg_is_resized_as_one_channel_then_made_rgb(tmp_path):
    from edtools.data import decode_image, plan_crop

    path = tmp_path / "grey.jpg"
    photo_like(900, 600).convert("L").save(path, quality=95)
    crop = plan_crop(900, 600, 192, 128)
    pixels = decode_image(path, crop)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
    reference = plain_pil(path, crop)
    assert np.abs(as_uint8(pixels).round() - reference).mean() < 1.5


def test_image_size_reads_the_header_like_the_scan(tmp_path):
    from edtools.data import image_size

    path = tmp_path / "turned.png"
    image = Image.new("RGB", (30, 20))
    exif = image.getexif()
    exif[0x0112] = 8
    image.save(path, exif=exif)
    assert image_size(path) == (20, 30)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg: the file is empty"):
        image_size(tmp_path / "empty.jpg")
