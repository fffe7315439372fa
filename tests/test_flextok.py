"""FlexTok: parity of its parts with the reference (tests/goldens/flextok_reference.npz, apple/ml-flextok @
87d00cc, made by tools/goldens/make_flextok.py), the register mask wired into the encoder, nested dropout,
the rectified-flow convention, jit-once over lengths, prefix semantics, row independence, errors, gradients and
a tiny overfit for both decoders."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import count_compiles
from tokcomp.tokenizers import flextok as F
from tokcomp.tokenizers.quantizers import FSQ
from tokcomp.tokenizers.transformer import prefix_mask

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "goldens", "flextok_reference.npz"))
K = 4
TINY = dict(num_latent_tokens=K, image_size=8, channels=1, patch_size=4, width=16, depth=1, num_heads=2,
            mlp_dim=32, flow_steps=3)
RNGS = lambda seed: {"params": jax.random.key(seed), "token_drop": jax.random.key(seed + 1),
                     "noise": jax.random.key(seed + 2)}


def images(batch=2, seed=0, size=8, channels=1):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, channels))


def randomized(params, seed=7, std=0.3):
  """Every parameter + N(0, std): the flow decoder's zero-initialised gates and head would otherwise make its
  output independent of the registers, and tests of what the output depends on could not fail."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [l + std * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def build(decoder="flow", seed=0, **kw):
  model = F.FlexTok(**{**TINY, "decoder": decoder, **kw})
  params = jax.jit(model.init)(RNGS(seed), images(1))
  return model, randomized(params, seed + 7)


# --- parity with the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flextok", "mixed"])
def test_fsq_matches_reference(name):
  assert float(GOLDEN["min_margin"]) > 1e-4  # no bounded value within 1e-4 of a rounding boundary
  levels = tuple(int(l) for l in GOLDEN[f"fsq/{name}/levels"])
  fsq = FSQ(levels)  # eps = 1e-3 with (1 + eps), as the reference bounds
  z = jnp.asarray(GOLDEN[f"fsq/{name}/z"])
  np.testing.assert_allclose(np.asarray(fsq.apply({}, z, method=fsq.bound)), GOLDEN[f"fsq/{name}/bounded"],
                             rtol=1e-5, atol=1e-5)
  z_q, aux = fsq.apply({}, z)
  np.testing.assert_allclose(np.asarray(z_q), GOLDEN[f"fsq/{name}/quant"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux["ids"]), GOLDEN[f"fsq/{name}/ids"])
  np.testing.assert_allclose(np.asarray(fsq.apply({}, aux["ids"], method=fsq.lookup)), GOLDEN[f"fsq/{name}/codes"],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,k", [(16, 8), (9, 5)])
def test_register_mask_matches_reference(n, k):
  ours = F.register_attention_mask(n, k)
  np.testing.assert_array_equal(ours, GOLDEN[f"mask/n{n}_k{k}"])
  assert not ours[:n, n:].any() and ours[n:, :n].all()  # patches never see registers; registers see all patches


def test_nested_dropout_replacement_matches_reference():
  regs, token = jnp.asarray(GOLDEN["dropout/registers"]), jnp.asarray(GOLDEN["dropout/mask_token"])
  keep = prefix_mask(jnp.asarray(GOLDEN["dropout/keep_k"], jnp.int32), regs.shape[1], regs.shape[0])
  np.testing.assert_array_equal(np.asarray(F.replace_dropped(regs, keep, token)), GOLDEN["dropout/out"])


def test_keep_length_sampling_matches_reference_modes():
  for k in (8, 6):  # the reference's uniform_pow2 rounds a draw up to a power of two (beyond K keeps all)
    ref = np.minimum(GOLDEN[f"dropout/uniform_pow2_k{k}"], k)
    np.testing.assert_array_equal(np.asarray(F.round_up_to_power_of_two(jnp.arange(1, k + 1), k)), ref)
  rng = jax.random.key(3)
  draws = {mode: np.asarray(F.sample_keep_lengths(rng, 4000, 8, mode)) for mode in F.NESTED_DROPOUT}
  assert set(draws["pow2"].tolist()) == set(GOLDEN["dropout/pow2_k8"].tolist())
  assert set(draws["uniform"].tolist()) == set(range(1, 9))
  assert set(draws["uniform_pow2"].tolist()) == {1, 2, 4, 8}
  counts = np.bincount(draws["uniform"], minlength=9)[1:] / 4000  # uniform: every k about 1/8
  np.testing.assert_allclose(counts, 1 / 8, atol=0.03)
  counts = np.bincount(draws["pow2"], minlength=9)[[1, 2, 4, 8]] / 4000  # pow2: uniform over {1, 2, 4, 8}
  np.testing.assert_allclose(counts, 1 / 4, atol=0.03)
  assert F.sample_keep_lengths(rng, 4000, 8, "uniform").dtype == jnp.int32


def test_time_embedding_matches_reference():
  t = GOLDEN["temb/t"]
  emb = F.timestep_embedding(jnp.asarray(t), 256)
  # the phases reach 1000 t (up to 1000 rad), where one fp32 ulp is 6e-5: compare at that resolution
  np.testing.assert_allclose(np.asarray(emb), GOLDEN["temb/emb"], rtol=0, atol=1e-4)
  freqs = 1000.0 * np.exp(-np.log(256.0) * np.arange(128) / 128)  # and both against float64 NumPy
  args = t[:, None].astype(np.float64) * freqs
  np.testing.assert_allclose(GOLDEN["temb/emb"], np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-4)
  np.testing.assert_allclose(np.asarray(emb), np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-4)


def test_noising_and_target_match_reference_and_numpy():
  clean, noise, sigmas = GOLDEN["noise/clean"], GOLDEN["noise/noise"], GOLDEN["noise/sigmas"]
  np.testing.assert_array_equal(sigmas, GOLDEN["noise/timesteps"])  # the model's t is the noise level
  x_t, target = F.noise_and_target(jnp.asarray(clean), jnp.asarray(noise), jnp.asarray(sigmas))
  np.testing.assert_allclose(np.asarray(x_t), GOLDEN["noise/noised"], rtol=1e-6, atol=1e-6)
  s = sigmas[:, None, None, None]
  np.testing.assert_allclose(np.asarray(x_t), s * noise + (1 - s) * clean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(target), noise - clean, rtol=1e-6, atol=1e-6)  # d x_t / d t
  # one Euler step of size dt along the exact velocity moves x_t to x_{t-dt}
  dt = 0.05
  x_prev, _ = F.noise_and_target(jnp.asarray(clean), jnp.asarray(noise), jnp.asarray(sigmas) - dt)
  np.testing.assert_allclose(np.asarray(F.euler_step(x_t, target, dt)), np.asarray(x_prev), rtol=1e-5, atol=1e-5)
  t = np.asarray(F.sample_timesteps(jax.random.key(0), 20000, "logit_normal"))
  logit = np.log(t / (1 - t))  # logit-normal: the logit is N(0, 1)
  assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03


def test_euler_sampler_matches_reference_and_numpy():
  steps, x1 = int(GOLDEN["euler/steps"]), GOLDEN["euler/x1"]
  velocity = lambda x, t: 0.5 * x + t.reshape(-1, *([1] * (x.ndim - 1)))  # the golden's stub field
  x0 = F.euler_sample(velocity, jnp.asarray(x1), steps)
  np.testing.assert_allclose(np.asarray(x0), GOLDEN["euler/x0"], rtol=1e-5, atol=1e-5)
  x = x1.astype(np.float64)
  for i in range(steps, 0, -1):
    x = x - (0.5 * x + i / steps) / steps
  np.testing.assert_allclose(np.asarray(x0), x, rtol=1e-5, atol=1e-5)


# --- the model -------------------------------------------------------------------------------------------------

def test_encoder_registers_are_causal():
  # register r depends on the registers <= r only: perturbing the learned register r+1.. leaves 0..r unchanged
  model, params = build("pixel")
  x = images(2)
  enc = jax.jit(lambda p: model.apply(p, x * 2 - 1, method=lambda m, y: m.encoder(y)))
  base = enc(params)
  r = 1
  p2 = jax.tree_util.tree_map(lambda a: a, params)
  bump = jax.random.normal(jax.random.key(4), params["params"]["encoder"]["registers"].shape)  # not a constant:
  # LayerNorm would remove a shift of all channels by the same amount
  p2["params"]["encoder"]["registers"] = params["params"]["encoder"]["registers"].at[r + 1:].add(bump[r + 1:])
  moved = enc(p2)
  np.testing.assert_allclose(np.asarray(moved[:, :r + 1]), np.asarray(base[:, :r + 1]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(moved[:, r + 1:]), np.asarray(base[:, r + 1:]), atol=1e-4)
  p3 = jax.tree_util.tree_map(lambda a: a, params)  # and a change to register 0 reaches every later one
  p3["params"]["encoder"]["registers"] = params["params"]["encoder"]["registers"].at[0].add(bump[0])
  assert not np.any(np.isclose(np.asarray(enc(p3))[:, 1:], np.asarray(base)[:, 1:], atol=1e-6).all(axis=-1))


@pytest.mark.parametrize("decoder", ["flow", "pixel"])
def test_jit_once_across_lengths(decoder):
  model, params = build(decoder)
  x = images(2)

  def run(p, x, length):
    z_q, _ = model.apply(p, x, method=model.encode)
    return model.apply(p, z_q, length=length, method=model.decode)

  fn, traces = count_compiles(run)
  outs = [fn(params, x, jnp.int32(n)) for n in (1, K // 2, K)]
  assert traces() == 1  # every scalar length: one compile
  outs.append(fn(params, x, jnp.asarray([1, K], jnp.int32)))
  fn(params, x, jnp.asarray([2, 3], jnp.int32))
  assert traces() == 2  # a [B] length vector has another shape: one more compile, for every vector
  assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[2]), atol=1e-4)  # the length matters
  np.testing.assert_allclose(np.asarray(outs[3][0]), np.asarray(outs[0][0]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(outs[3][1]), np.asarray(outs[2][1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder", ["flow", "pixel"])
def test_tokens_after_the_prefix_have_no_effect(decoder):
  model, params = build(decoder)
  z_q, _ = model.apply(params, images(2), method=model.encode)
  dec = jax.jit(lambda z, n: model.apply(params, z, length=n, method=model.decode))
  for length in (1, 2, 3):
    base = dec(z_q, jnp.int32(length))
    tail = dec(z_q.at[:, length:].set(-z_q[:, length:] + 0.5), jnp.int32(length))
    np.testing.assert_allclose(np.asarray(tail), np.asarray(base), rtol=1e-6, atol=1e-6)
    head = dec(z_q.at[:, length - 1].set(-z_q[:, length - 1] + 0.5), jnp.int32(length))
    assert not np.allclose(np.asarray(head), np.asarray(base), atol=1e-4)  # the kept tokens do matter
  ids = model.apply(params, images(2), method=model.encode)[1]["ids"]
  np.testing.assert_allclose(np.asarray(model.apply(params, ids, length=2, method=model.decode_tokens)),
                             np.asarray(dec(z_q, jnp.int32(2))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder", ["flow", "pixel"])
def test_rows_are_independent(decoder):
  model, params = build(decoder)
  x = images(3, seed=1)
  rec = jax.jit(lambda x, n: model.apply(params, x, length=n, method=model.reconstruct))
  lengths = jnp.asarray([1, 3, 4], jnp.int32)
  full = rec(x, lengths)
  moved = rec(x.at[1].set(1.0 - x[1]), lengths)
  np.testing.assert_allclose(np.asarray(moved)[[0, 2]], np.asarray(full)[[0, 2]], rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(moved[1]), np.asarray(full[1]), atol=1e-4)
  # a row's reconstruction does not depend on the batch it is in (the fixed noise is one draw shared by the
  # rows; a per-batch draw would differ by O(1)). Tolerance: a single decoder call agrees to ~4e-7 relative
  # between batch sizes 1 and 3 (XLA CPU blocking), which the randomised decoder amplifies to ~6e-4 over the
  # Euler steps of the flow sampler.
  atol = 2e-3 if decoder == "flow" else 1e-5
  for i in range(3):
    single = rec(x[i:i + 1], lengths[i:i + 1])
    np.testing.assert_allclose(np.asarray(single[0]), np.asarray(full[i]), rtol=1e-5, atol=atol)


def test_training_nested_dropout_is_prefix_decoding():
  # the pixel decoder in training equals eval decoding at the per-example kept length the stream drew
  model, params = build("pixel", nested_dropout="uniform")
  x = images(3, seed=2)
  out = model.apply(params, x, train=True, rngs={"token_drop": jax.random.key(5)})
  again = model.apply(params, x, train=True, rngs={"token_drop": jax.random.key(5)})
  np.testing.assert_array_equal(np.asarray(out["recon"]), np.asarray(again["recon"]))
  evals = [np.asarray(model.apply(params, x, length=n, method=model.reconstruct)) for n in range(1, K + 1)]
  found = []
  for b in range(3):
    hits = [n for n in range(1, K + 1) if np.allclose(evals[n - 1][b], np.asarray(out["recon"][b]), atol=1e-5)]
    assert len(hits) == 1, hits
    found.append(hits[0])
  np.testing.assert_allclose(float(out["metrics"]["kept_length_mean"]), np.mean(found), rtol=1e-6)
  seen = set()  # across keys, the drawn lengths vary per example
  for s in range(6):
    o = model.apply(params, x, train=True, rngs={"token_drop": jax.random.key(10 + s)})
    seen.add(float(o["metrics"]["kept_length_mean"]))
  assert len(seen) > 1


def test_flow_call_returns_loss_not_recon_in_training_and_is_deterministic_in_eval():
  model, params = build("flow")
  x = images(2)
  rngs = lambda s: {"token_drop": jax.random.key(s), "noise": jax.random.key(s + 1)}
  out = model.apply(params, x, train=True, rngs=rngs(0))
  assert out["recon"] is None and set(out["losses"]) == {"flow"} and np.isfinite(float(out["losses"]["flow"]))
  same = model.apply(params, x, train=True, rngs=rngs(0))
  other = model.apply(params, x, train=True, rngs=rngs(2))
  assert float(same["losses"]["flow"]) == float(out["losses"]["flow"])
  assert float(other["losses"]["flow"]) != float(out["losses"]["flow"])
  ev1, ev2 = model.apply(params, x, length=2), model.apply(params, x, length=2)
  np.testing.assert_array_equal(np.asarray(ev1["recon"]), np.asarray(ev2["recon"]))
  np.testing.assert_allclose(np.asarray(ev1["recon"]),
                             np.asarray(model.apply(params, x, length=2, method=model.reconstruct)), atol=1e-6)


def test_classifier_free_guidance():
  model, params = build("flow", cond_drop_prob=0.2)
  guided = model.clone(guidance_scale=3.0)
  x = images(2)
  z_q, _ = model.apply(params, x, method=model.encode)
  plain = model.apply(params, z_q, length=3, method=model.decode)
  g = guided.apply(params, z_q, length=3, method=guided.decode)
  assert not np.allclose(np.asarray(plain), np.asarray(g), atol=1e-4)
  one = model.clone(guidance_scale=1.0)  # scale 1 is the conditional sampler exactly
  np.testing.assert_allclose(np.asarray(one.apply(params, z_q, length=3, method=one.decode)), np.asarray(plain))
  out = model.apply(params, x, train=True, rngs={"token_drop": jax.random.key(0), "noise": jax.random.key(1)})
  assert np.isfinite(float(out["losses"]["flow"]))


@pytest.mark.parametrize("kw,match", [
    (dict(decoder="vae"), "FlexTok.decoder"),
    (dict(nested_dropout="exp"), "FlexTok.nested_dropout"),
    (dict(nested_dropout="pow2", num_latent_tokens=6), "power of two"),
    (dict(patch_size=3), "FlexTok.patch_size"),
    (dict(num_latent_tokens=0), "FlexTok.num_latent_tokens"),
    (dict(flow_steps=0), "FlexTok.flow_steps"),
    (dict(flow_timesteps="cosine"), "FlexTok.flow_timesteps"),
    (dict(guidance_scale=2.0), "FlexTok.guidance_scale"),
    (dict(cond_drop_prob=1.0), "FlexTok.cond_drop_prob"),
    (dict(decoder="pixel", cond_drop_prob=0.1), "FlexTok.cond_drop_prob"),
    (dict(decoder_num_heads=3), "FlexTok.decoder_num_heads"),
])
def test_bad_config_raises(kw, match):
  with pytest.raises(ValueError, match=match):
    F.FlexTok(**{**TINY, **kw})


def test_bad_inputs_raise():
  model, params = build("pixel")
  with pytest.raises(ValueError, match="image_size, channels"):
    model.apply(params, images(1, size=12), method=model.reconstruct)
  with pytest.raises(ValueError, match=r"length=5: must be in 1..4"):
    model.apply(params, images(1), length=5, method=model.reconstruct)
  with pytest.raises(ValueError, match="length=0"):
    model.apply(params, images(1), length=0, method=model.reconstruct)


@pytest.mark.parametrize("decoder", ["flow", "pixel"])
def test_gradients_are_finite_and_reach_the_encoder(decoder):
  model = F.FlexTok(**{**TINY, "decoder": decoder})
  params = jax.jit(model.init)(RNGS(0), images(1))
  x = images(2)

  def loss(p):
    out = model.apply(p, x, train=True, rngs={"token_drop": jax.random.key(1), "noise": jax.random.key(2)})
    total = sum(out["losses"].values())
    return total + (0.0 if out["recon"] is None else jnp.mean(jnp.square(out["recon"] - x)))

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  # with the flow decoder's zero-initialised head the first gradient reaches only the head; the pixel decoder's
  # reaches the encoder at once through the FSQ straight-through
  enc = grads["params"]["encoder"]
  if decoder == "pixel":
    assert float(jnp.abs(enc["to_latent"]["kernel"]).sum()) > 0
  else:
    assert float(jnp.abs(grads["params"]["flow"]["head"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("decoder", ["flow", "pixel"])
def test_tiny_overfit_lowers_the_loss(decoder):
  model = F.FlexTok(**{**TINY, "decoder": decoder, "width": 32, "mlp_dim": 64})
  x = images(4, seed=3)
  params = jax.jit(model.init)(RNGS(0), x[:1])
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(p, key):
    d, n = jax.random.split(key)
    out = model.apply(p, x, train=True, rngs={"token_drop": d, "noise": n})
    return sum(out["losses"].values()) + (0.0 if out["recon"] is None else jnp.mean(jnp.square(out["recon"] - x)))

  @jax.jit
  def step(p, o, key):
    loss, g = jax.value_and_grad(loss_fn)(p, key)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  eval_key = jax.random.key(99)  # a fixed draw of lengths, times and noise to compare before and after
  loss_fn = jax.jit(loss_fn)
  before = float(loss_fn(params, eval_key))
  for i in range(40):
    params, opt, _ = step(params, opt, jax.random.key(i))
  after = float(loss_fn(params, eval_key))
  assert after < 0.7 * before, (before, after)
