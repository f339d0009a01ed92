"""The loss maths: loss_scale acts on gradients linearly, short batches weigh images like full ones, targets.

Gradients are compared on a small real module, not just loss values.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edtools.train.loss import (  # noqa: E402
    batch_loss,
    compute_snr,
    min_snr_weights,
    per_sample_mse,
    prediction_target,
)

NOMINAL = 4


def scheduler(prediction_type: str = "epsilon", **kwargs):
    return diffusers.DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        **kwargs,
    )


@pytest.fixture
def setup():
    """A tiny conv 'denoiser', a batch of 3 inputs and targets (a short batch for nominal size 4)."""
    generator = torch.Generator().manual_seed(0)
    module = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    inputs = torch.randn(3, 4, 6, 6, generator=generator)
    targets = torch.randn(3, 4, 6, 6, generator=generator)
    return module, inputs, targets


def gradients(module, inputs, targets, loss_scale, *, nominal=NOMINAL, batch_weight=1.0, snr_weights=None):
    module.zero_grad()
    per_sample = per_sample_mse(module(inputs), targets)
    loss = batch_loss(
        per_sample,
        torch.tensor(loss_scale),
        nominal_batch_size=nominal,
        batch_weight=batch_weight,
        snr_weights=snr_weights,
    )
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


def test_loss_scale_zero_removes_an_image_from_the_gradient(setup):
    module, inputs, targets = setup
    _, scaled_out = gradients(module, inputs, targets, [0.0, 1.0, 1.0])
    _, without = gradients(module, inputs[1:], targets[1:], [1.0, 1.0])
    changed = inputs.clone()
    changed[0] = 100.0  # whatever image 0 is, it contributes nothing
    _, changed_grads = gradients(module, changed, targets, [0.0, 1.0, 1.0])
    for a, b, c in zip(scaled_out, without, changed_grads, strict=True):
        torch.testing.assert_close(a, b)
        assert torch.equal(a, c)
    _, only_zero = gradients(module, inputs[:1], targets[:1], [0.0])
    assert all(torch.count_nonzero(g) == 0 for g in only_zero)


def test_loss_scale_two_gives_exactly_twice_the_gradient_of_one(setup):
    module, inputs, targets = setup
    loss_1, grads_1 = gradients(module, inputs, targets, [1.0, 1.0, 1.0])
    loss_2, grads_2 = gradients(module, inputs, targets, [2.0, 2.0, 2.0])
    assert loss_2 == 2 * loss_1
    for g1, g2 in zip(grads_1, grads_2, strict=True):
        assert torch.count_nonzero(g1) > 0
        assert torch.equal(g2, 2 * g1)
    # Per image: doubling one image's scale adds exactly its own contribution once more.
    _, base = gradients(module, inputs, targets, [1.0, 1.0, 1.0])
    _, doubled = gradients(module, inputs, targets, [1.0, 2.0, 1.0])
    _, alone = gradients(module, inputs[1:2], targets[1:2], [1.0])
    for g_base, g_doubled, g_alone in zip(base, doubled, alone, strict=True):
        torch.testing.assert_close(g_doubled, g_base + g_alone)


def test_negative_loss_scale_reverses_the_gradient(setup):
    module, inputs, targets = setup
    _, plus = gradients(module, inputs, targets, [1.0, 1.0, 1.0])
    _, minus = gradients(module, inputs, targets, [-1.0, -1.0, -1.0])
    for p, m in zip(plus, minus, strict=True):
        assert torch.equal(m, -p)


def test_short_batch_weighs_each_image_like_a_full_batch(setup):
    module, inputs, targets = setup
    per_sample = per_sample_mse(module(inputs), targets).detach()
    short = batch_loss(per_sample, torch.ones(3), nominal_batch_size=NOMINAL)
    torch.testing.assert_close(short, per_sample.sum() / NOMINAL)
    assert not math.isclose(short.item(), per_sample.mean().item())  # a plain mean would up-weight them

    # The gradient an image gives is the same whether its batch is short (3 of 4) or full (4 of 4).
    _, alone_short = gradients(module, inputs[:1], targets[:1], [1.0])
    full_inputs = torch.cat([inputs, inputs[:1]])
    full_targets = torch.cat([targets, targets[:1]])
    _, full = gradients(module, full_inputs, full_targets, [1.0, 1.0, 1.0, 1.0])
    _, full_without_0 = gradients(module, full_inputs, full_targets, [0.0, 1.0, 1.0, 0.0])
    for g_alone, g_full, g_rest in zip(alone_short, full, full_without_0, strict=True):
        torch.testing.assert_close(g_full - g_rest, 2 * g_alone)


def test_filler_batch_trains_nothing(setup):
    module, inputs, targets = setup
    loss, grads = gradients(module, inputs, targets, [1.0, 1.0, 1.0], batch_weight=0.0)
    assert loss == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_snr_weights_multiply_per_image(setup):
    module, inputs, targets = setup
    per_sample = per_sample_mse(module(inputs), targets).detach()
    weights = torch.tensor([0.5, 1.0, 2.0])
    scale = torch.tensor([1.0, 3.0, 0.0])
    got = batch_loss(per_sample, scale, nominal_batch_size=NOMINAL, snr_weights=weights)
    torch.testing.assert_close(got, (per_sample * scale * weights).sum() / NOMINAL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nominal_batch_size": 0}, "nominal_batch_size"),
        ({"nominal_batch_size": 2}, "more than nominal_batch_size"),
        ({"nominal_batch_size": 4, "batch_weight": -1.0}, "batch_weight"),
        ({"nominal_batch_size": 4, "batch_weight": float("nan")}, "batch_weight"),
        ({"nominal_batch_size": 4, "snr_weights": torch.ones(2)}, "snr_weights"),
    ],
)
def test_batch_loss_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        batch_loss(torch.ones(3), torch.ones(3), **kwargs)
    with pytest.raises(ValueError, match="loss_scale"):
        batch_loss(torch.ones(3), torch.ones(2), nominal_batch_size=4)


def test_per_sample_mse_is_float32_mean_per_image():
    generator = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 4, 5, 5, generator=generator)
    target = torch.randn(3, 4, 5, 5, generator=generator)
    got = per_sample_mse(pred.half(), target.half())
    assert got.dtype == torch.float32 and got.shape == (3,)
    for i in range(3):
        expected = torch.nn.functional.mse_loss(pred[i].half().float(), target[i].half().float())
        torch.testing.assert_close(got[i], expected)
    with pytest.raises(ValueError, match="shape"):
        per_sample_mse(pred, target[:, :2])


def test_prediction_targets():
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    assert prediction_target(scheduler("epsilon"), latents, noise, timesteps) is noise
    v_scheduler = scheduler("v_prediction")
    velocity = prediction_target(v_scheduler, latents, noise, timesteps)
    assert torch.equal(velocity, v_scheduler.get_velocity(latents, noise, timesteps))
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0, from the schedule's own alpha_bar
    alpha_bar = v_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(velocity, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)
    assert not torch.allclose(velocity, noise)
    with pytest.raises(ValueError, match="epsilon or v_prediction"):
        prediction_target(scheduler("sample"), latents, noise, timesteps)


def test_compute_snr_matches_the_formula_and_diffusers():
    from diffusers.training_utils import compute_snr as diffusers_snr

    noise_scheduler = scheduler()
    timesteps = torch.tensor([0, 1, 10, 250, 500, 999])
    snr = compute_snr(noise_scheduler, timesteps)
    alpha_bar = noise_scheduler.alphas_cumprod[timesteps].double()
    torch.testing.assert_close(snr.double(), alpha_bar / (1 - alpha_bar), rtol=1e-5, atol=0)
    torch.testing.assert_close(snr, diffusers_snr(noise_scheduler, timesteps), rtol=1e-4, atol=0)
    assert snr.dtype == torch.float32 and bool((snr[:-1] > snr[1:]).all())  # noise grows with t


def test_min_snr_weights_match_the_formula():
    snr = torch.tensor([0.01, 0.5, 1.0, 4.9, 5.0, 20.0, 1000.0])
    gamma = 5.0
    eps = min_snr_weights(snr, gamma, "epsilon")
    v = min_snr_weights(snr, gamma, "v_prediction")
    for i, s in enumerate(snr.tolist()):
        assert eps[i].item() == pytest.approx(min(s, gamma) / s, rel=1e-6)
        assert v[i].item() == pytest.approx(min(s, gamma) / (s + 1), rel=1e-6)
    assert eps[0] == pytest.approx(1.0) and eps[-1] == pytest.approx(gamma / 1000)


def test_min_snr_weights_at_zero_terminal_snr():
    noise_scheduler = scheduler("v_prediction", rescale_betas_zero_snr=True)
    snr = compute_snr(noise_scheduler, torch.tensor([999]))
    assert snr.item() == 0
    assert min_snr_weights(snr, 5.0, "v_prediction").item() == 0
    assert min_snr_weights(snr, 5.0, "epsilon").item() == 1  # the limit of min(snr, gamma) / snr
    assert torch.isfinite(min_snr_weights(torch.tensor([0.0, 1.0]), 5.0, "epsilon")).all()


@pytest.mark.parametrize("gamma", [0, -1.0, float("inf"), float("nan"), True])
def test_min_snr_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="min_snr_gamma"):
        min_snr_weights(torch.ones(2), gamma, "epsilon")


def test_min_snr_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(torch.ones(2), 5.0, "sample")
