"""UNet conditioning equals what diffusers' own pipelines feed the UNet: SD's last hidden states, SDXL's
concatenated penultimate states, pooled embedding and time ids; cached embeddings equal fresh ones."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from edtools.data import token_ids  # noqa: E402
from edtools.models import make_pipeline, tiny_components  # noqa: E402
from edtools.models.conditioning import TextEmbeddingCache, encode_text, unet_conditioning  # noqa: E402

PROMPTS = ["a photo of a cat", "a red dog in the style of a painting"]


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def components(request):
    return tiny_components(request.param)


def ids(components, prompts=PROMPTS):
    return [token_ids(tokenizer, prompts) for tokenizer in components.tokenizers]


def test_text_embeddings_equal_the_pipelines_own(components):
    pipeline = make_pipeline(components)
    with torch.no_grad():
        ours = encode_text(components, ids(components))
        if components.architecture == "sdxl":
            hidden, _, pooled, _ = pipeline.encode_prompt(
                PROMPTS, device="cpu", do_classifier_free_guidance=False
            )
            torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
            assert ours.hidden.shape[-1] == components.unet.config.cross_attention_dim == 32 + 64
        else:
            hidden, _ = pipeline.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
            assert ours.pooled is None
    torch.testing.assert_close(ours.hidden, hidden, rtol=0, atol=0)


def test_unet_conditioning_runs_the_unet(components):
    with torch.no_grad():
        embeddings = encode_text(components, ids(components))
        time_ids = torch.tensor([[600, 400, 0, 12, 64, 64], [64, 64, 0, 0, 64, 64]])
        kwargs = unet_conditioning(components, embeddings, time_ids, device="cpu")
        noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = components.unet(noisy, torch.tensor([10, 500]), **kwargs).sample
    assert out.shape == noisy.shape and torch.isfinite(out).all()
    if components.architecture == "sdxl":
        assert kwargs["added_cond_kwargs"]["time_ids"].dtype == embeddings.pooled.dtype
        # the time ids matter: another original size gives another prediction
        other = dict(
            kwargs, added_cond_kwargs=dict(kwargs["added_cond_kwargs"], time_ids=time_ids.flip(0).float())
        )
        with torch.no_grad():
            assert not torch.allclose(components.unet(noisy, torch.tensor([10, 500]), **other).sample, out)
        with pytest.raises(ValueError, match="time ids"):
            unet_conditioning(components, embeddings, None, device="cpu")
    else:
        assert set(kwargs) == {"encoder_hidden_states"}


def test_cache_returns_what_the_encoders_give(components):
    cache = TextEmbeddingCache()
    cache.fill(components, PROMPTS + PROMPTS[:1], batch_size=1)
    assert len(cache) == 2
    with torch.no_grad():
        fresh = encode_text(components, ids(components, PROMPTS[::-1]))
    cached = cache.get(PROMPTS[::-1])
    torch.testing.assert_close(cached.hidden, fresh.hidden, rtol=1e-6, atol=1e-6)
    if components.architecture == "sdxl":
        torch.testing.assert_close(cached.pooled, fresh.pooled, rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyError, match="never encoded"):
        cache.get(["an unseen caption"])
