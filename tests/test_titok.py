"""TiTok: parity with bytedance/1d-tokenizer through the checkpoint loader, prefix masks, jit once, errors.

Goldens: tests/goldens/titok_{nonlegacy,legacy}.npz (tools/goldens/make_titok.py, reference @ 942a96f; 32 px,
patch 8, width 24, 3 heads, 2 layers, K = 8, token_size 12, codebook 64, l2 VQ, batch 3) and
maskgit_vqgan_decoder.npz (the reference's MaskGIT VQGAN pixel decoder, tiny). Tolerance 1e-5, fp32.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from helpers import count_compiles
from tokcomp.checkpoints import titok as titok_ckpt
from tokcomp.tokenizers import titok

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(image_size=16, channels=3, patch_size=4, num_latent_tokens=8, token_size=6, codebook_size=32,
            encoder_size=None, encoder_width=32, encoder_depth=1, encoder_heads=2,
            decoder_size=None, decoder_width=32, decoder_depth=2, decoder_heads=2)


def golden(name):
  g = np.load(os.path.join(HERE, "goldens", name + ".npz"), allow_pickle=False)
  config = json.loads(str(g["config"]))
  state = {k[len("param/"):]: g[k] for k in g.files if k.startswith("param/")}
  return config, state, {k: g[k] for k in g.files if not k.startswith("param/")}


def write_hub_dir(path, config, state):
  """What the reference's `save_pretrained` writes: config.json (the OmegaConf tree) + model.safetensors."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(path, "model.safetensors"))
  return str(path)


def tiny(**kw):
  model = titok.TiTok(**{**TINY, **kw})
  images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3))
  return model, jax.jit(model.init)(jax.random.key(0), images), images


def jitted(model, method=None, **static):
  """model.apply(params, *args, method=..., **static) under jit (eager linen applies are slow on a busy CPU)."""
  return jax.jit(lambda p, *a: model.apply(p, *a, method=method, **static))


def close(a, b, tol=1e-5, msg=""):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol, err_msg=msg)


@pytest.mark.parametrize("name", ["titok_nonlegacy", "titok_legacy"])
def test_parity_with_reference_through_the_loader(tmp_path, name):
  config, state, g = golden(name)
  assert g["vq_margin"] > 1e-3, "the fixture's nearest codes must be clearly nearest"
  model, params = titok_ckpt.load(write_hub_dir(tmp_path / "hub", config, state), num_heads=config["heads"])
  assert model.is_legacy == config["model"]["vq_model"]["is_legacy"]
  images = jnp.asarray(g["images"])
  z = jax.jit(lambda p, x: model.apply(p, x, method=model.encode_latents))(params, images)
  close(z, g["z"], msg="z before quantisation")
  z_q, aux = jax.jit(lambda p, x: model.apply(p, x, method=model.encode))(params, images)
  np.testing.assert_array_equal(np.asarray(aux["ids"]), g["ids"])
  assert len({tuple(r) for r in g["ids"].tolist()}) == 3, "the codes depend on the image"
  close(z_q, g["z_q"], msg="z_q")
  decoded = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))(params, z_q)
  close(decoded, g["decoded"], msg="decode(encode(x))")
  from_ids = jax.jit(lambda p, i: model.apply(p, i, method=model.decode_tokens))(params, jnp.asarray(g["ids"]))
  close(from_ids, g["decoded_tokens"], msg="decode_tokens(ids)")
  expected = (3, 32, 32, 3) if not model.is_legacy else (3, 4, 4, titok.VQGAN_CODES)
  assert decoded.shape == expected


def test_legacy_reshape_is_not_a_transpose():
  """The legacy encoder feeds conv_out the raw reshape [B, K, W] -> [B, W, K]: same params, other latents."""
  kw = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, num_latent_tokens=8, token_size=6)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  new, old = titok.TiTokEncoder(**kw), titok.TiTokEncoder(**kw, is_legacy=True)
  params = new.init(jax.random.key(0), images)
  z_new, state = jax.jit(lambda p, x: new.apply(p, x, capture_intermediates=lambda m, _: m.name == "ln_post"))(
      params, images)
  z_old = jitted(old)(params, images)
  tokens = np.asarray(state["intermediates"]["ln_post"]["__call__"][0])  # [B, K, W] before conv_out
  w, b = (np.asarray(params["params"]["conv_out"][n]) for n in ("kernel", "bias"))
  close(z_new, tokens @ w + b)
  close(z_old, tokens.reshape(2, 32, 8).transpose(0, 2, 1) @ w + b)  # torch's .reshape(B, W, K, 1)
  assert not np.allclose(z_new, z_old, atol=1e-3)


def test_decode_at_length_l_is_the_decoder_seeing_only_l_tokens():
  model, params, images = tiny()
  z_q, _ = jitted(model, "encode")(params, images)
  decode = jax.jit(lambda p, z, n: model.apply(p, z, length=n, method=model.decode))
  for length in (1, 3, 8):
    masked = decode(params, z_q, jnp.int32(length))
    # an independent model that has only L latent tokens (the reference's sliced sequence)
    short = titok.TiTok(**{**TINY, "num_latent_tokens": length})
    p = jax.tree_util.tree_map(lambda a: a, params)
    p["params"]["decoder"]["latent_token_positional_embedding"] = \
        params["params"]["decoder"]["latent_token_positional_embedding"][:length]
    sliced = jitted(short, "decode")(p, z_q[:, :length])
    close(masked, sliced, msg=f"length {length}")
  # tokens after L have no effect, even NaN ones; tokens before L do
  base = decode(params, z_q, jnp.int32(3))
  close(base, decode(params, z_q.at[:, 3:].set(jnp.nan), jnp.int32(3)))
  assert not np.allclose(base, decode(params, z_q.at[:, 2].add(1.0), jnp.int32(3)), atol=1e-4)


def test_length_vector_is_per_row_and_rows_are_independent():
  model, params, images = tiny()
  z_q, _ = jitted(model, "encode")(params, images)
  lengths = jnp.array([1, 5, 8])
  decode = jax.jit(lambda p, z, n: model.apply(p, z, length=n, method=model.decode))
  per_row = decode(params, z_q, lengths)
  for i, n in enumerate([1, 5, 8]):
    close(per_row[i], decode(params, z_q[i:i + 1], jnp.int32(n))[0], msg=f"row {i}")
  reconstruct = jitted(model, "reconstruct")
  close(reconstruct(params, images)[1:2], reconstruct(params, images[1:2]))


def test_encode_decode_compile_once_for_every_length():
  model, params, images = tiny()

  def run(p, x, n):
    return model.apply(p, x, length=n, method=model.reconstruct)

  f, traces = count_compiles(run)
  outs = [f(params, images, jnp.int32(n)) for n in (1, 4, 8)]
  outs.append(f(params, images, jnp.int32(2)))
  assert traces() == 1
  g, traces_vec = count_compiles(run)
  g(params, images, jnp.array([1, 4, 8], jnp.int32))
  g(params, images * 0.5, jnp.array([8, 2, 3], jnp.int32))
  assert traces_vec() == 1
  assert not np.allclose(outs[0], outs[2], atol=1e-4), "length 1 and 8 decode differently"
  close(outs[2], jitted(model, "reconstruct")(params, images))
  # a traced length out of range is clipped (documented): 0 -> 1, 99 -> K
  close(f(params, images, jnp.int32(0)), outs[0])
  close(f(params, images, jnp.int32(99)), outs[2])


def test_call_losses_metrics_and_finite_gradients():
  model, params, images = tiny()
  out = jitted(model, train=True)(params, images)
  assert out["recon"].shape == images.shape
  assert set(out["losses"]) == {"quantizer"} and float(out["metrics"]["kept_length"]) == 8.0

  def loss(p):
    o = model.apply(p, images, train=True)
    return jnp.mean(jnp.abs(o["recon"] - images)) + sum(o["losses"].values())

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  enc = grads["params"]["encoder"]
  assert np.abs(np.asarray(enc["latent_tokens"])).sum() > 0, "straight-through: the encoder gets gradients"
  assert np.abs(np.asarray(grads["params"]["quantize"]["codebook"])).sum() > 0


def test_short_overfit_lowers_the_reconstruction_loss():
  model, params, _ = tiny(decoder_depth=1, use_l2_norm=False, codebook_size=16)
  images = jax.random.uniform(jax.random.key(3), (4, 16, 16, 3))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    def loss(p):
      out = model.apply(p, images, train=True)
      return jnp.mean(jnp.square(out["recon"] - images)) + out["losses"]["quantizer"]
    value, g = jax.value_and_grad(loss)(p)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, value

  first = None
  for _ in range(30):
    params, opt, value = step(params, opt)
    first = value if first is None else first
  final = jnp.mean(jnp.square(jitted(model, "reconstruct")(params, images) - images))
  assert float(final) < 0.5 * float(first), (float(first), float(final))


def test_named_sizes_and_any_k():
  assert titok.resolve_size("encoder", "S", None, None, None) == (512, 8, 8)
  assert titok.resolve_size("encoder", "base", None, None, None) == (768, 12, 12)
  assert titok.resolve_size("decoder", "L", None, None, None) == (1024, 24, 16)
  assert titok.resolve_size("decoder", "L", None, 2, None) == (1024, 2, 16)
  model = titok.TiTok(image_size=32, patch_size=16, num_latent_tokens=5, encoder_size="S", decoder_size="S")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert shapes["encoder"]["latent_tokens"].shape == (5, 512)
  assert len([k for k in shapes["decoder"]["transformer"] if k.startswith("encoderblock_")]) == 8
  assert shapes["encoder"]["transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"][
      "kernel"].shape == (512, 8, 64)


def test_legacy_call_gives_logits_and_reconstruct_refuses():
  model, params, images = tiny(is_legacy=True)
  out = jitted(model)(params, images)
  assert out["recon"] is None and out["logits"].shape == (3, 4, 4, titok.VQGAN_CODES)
  with pytest.raises(ValueError, match="is_legacy=True"):
    model.apply(params, images, method=model.reconstruct)


def test_fsq_quantizer_option():
  model, params, images = tiny(quantizer="fsq", fsq_levels=(5, 5, 4), token_size=3)
  z_q, aux = jitted(model, "encode")(params, images)
  assert z_q.shape == (3, 8, 3) and int(aux["ids"].max()) < 100
  close(jitted(model, "decode_tokens")(params, aux["ids"]), jitted(model, "decode")(params, z_q))


@pytest.mark.parametrize("kw, field", [
    (dict(encoder_size="XL"), "encoder_size"),
    (dict(decoder_size=None, decoder_width=None), "decoder_width"),
    (dict(encoder_heads=3), "encoder_heads"),
    (dict(patch_size=5), "patch_size"),
    (dict(decoder_patch_size=3), "decoder_patch_size"),
    (dict(num_latent_tokens=0), "num_latent_tokens"),
    (dict(quantizer="lfq"), "quantizer"),
    (dict(quantizer="fsq", token_size=4), "token_size"),
    (dict(finetune_decoder=True), "finetune_decoder"),
    (dict(finetune_decoder=True, is_legacy=True, vqgan_channel_mult=(1, 1)), "finetune_decoder"),
])
def test_bad_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=rf"TiTok\.{field}"):
    titok.TiTok(**{**TINY, **kw})


def test_bad_inputs_raise_at_trace_time():
  model, params, images = tiny()
  with pytest.raises(ValueError, match="image_size"):
    model.apply(params, jnp.zeros((1, 32, 32, 3)), method=model.encode)
  with pytest.raises(ValueError, match="channels"):
    model.apply(params, jnp.zeros((1, 16, 16, 1)), method=model.encode)
  z_q, _ = jitted(model, "encode")(params, images)
  for bad in (0, 9):
    with pytest.raises(ValueError, match=rf"length={bad}: must be in 1..8"):
      model.apply(params, z_q, length=bad, method=model.decode)
  with pytest.raises(ValueError, match="num_latent_tokens"):
    model.apply(params, z_q[:, :5], method=model.decode)


def test_loader_errors_name_the_keys(tmp_path):
  config, state, _ = golden("titok_nonlegacy")
  with pytest.raises(ValueError, match="pass num_heads"):
    titok_ckpt.load(write_hub_dir(tmp_path / "a", config, state))
  extra = {**state, "decoder.extra.weight": np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="unexpected keys.*decoder.extra.weight"):
    titok_ckpt.load(write_hub_dir(tmp_path / "b", config, extra), num_heads=3)
  missing = {k: v for k, v in state.items() if k != "decoder.ln_post.bias"}
  with pytest.raises(ValueError, match="missing key 'decoder.ln_post.bias'"):
    titok_ckpt.load(write_hub_dir(tmp_path / "c", config, missing), num_heads=3)
  wrong = json.loads(json.dumps(config))
  wrong["model"]["vq_model"]["num_latent_tokens"] = 32
  with pytest.raises(ValueError, match="num_latent_tokens=32 but the weights say 8"):
    titok_ckpt.load(write_hub_dir(tmp_path / "d", wrong, state), num_heads=3)
  pixel = {**state, "pixel_decoder.conv_in.weight": np.zeros((4, 4), np.float32)}
  with pytest.raises(ValueError, match="finetune_decoder.*=False but the weights say True"):
    titok_ckpt.load(write_hub_dir(tmp_path / "e", config, pixel), num_heads=3)
  model, _ = titok_ckpt.load(write_hub_dir(tmp_path / "f", config, pixel), num_heads=3, skip_pixel_decoder=True)
  assert model.num_latent_tokens == 8
  wrapped = write_hub_dir(tmp_path / "g", {"config": config}, state)  # a {"config": tree} wrapper
  assert titok_ckpt.load(wrapped, num_heads=3)[0].image_size == 32
  os.remove(os.path.join(wrapped, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="never unpickles"):
    titok_ckpt.load(wrapped, num_heads=3)


def torch_layout(flat):
  """flax {path: array} of a PixelDecoder -> the reference's state dict names/layouts (test helper)."""
  out = {}
  for path, v in flat.items():
    module, leaf = path.rsplit("/", 1)
    module = module.replace("/", ".")
    for pattern, repl in ((r"^up_(\d+)_block_(\d+)", r"up.\1.block.\2"),
                          (r"^up_(\d+)_upsample_conv", r"up.\1.upsample_conv"), (r"^mid_(\d+)", r"mid.\1")):
      module = re.sub(pattern, repl, module)
    v = np.asarray(v)
    out[f"{module}.{'bias' if leaf == 'bias' else 'weight'}"] = v.transpose(3, 2, 0, 1) if leaf == "kernel" else v
  return out


def test_maskgit_vqgan_decoder_parity():
  from tokcomp.tokenizers import maskgit_vqgan
  g = np.load(os.path.join(HERE, "goldens", "maskgit_vqgan_decoder.npz"), allow_pickle=False)
  state = {k[len("param/"):]: g[k] for k in g.files if k.startswith("param/")}
  config, flat = titok_ckpt.pixel_decoder_arrays(state)
  assert config == dict(hidden_channels=32, channel_mult=(2, 1), res_blocks=1)
  model = maskgit_vqgan.PixelDecoder(config["hidden_channels"], config["channel_mult"], config["res_blocks"])
  params = {"params": traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})}
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 8)))
  assert jax.tree_util.tree_map(np.shape, expected) == jax.tree_util.tree_map(np.shape, params)
  close(jax.jit(model.apply)(params, jnp.asarray(g["z"])), g["decoded"])


def test_finetune_decoder_loads_and_composes(tmp_path):
  """A legacy checkpoint with a MaskGIT VQGAN pixel decoder: decode = PixelDecoder(softmax(logits) @ E)."""
  from tokcomp.tokenizers import maskgit_vqgan
  config, state, g = golden("titok_legacy")
  vqgan = maskgit_vqgan.PixelDecoder(32, (1, 1, 1, 1), 1)  # 4x4 grid -> x8 -> 32 px
  vq_params = jax.jit(vqgan.init)(jax.random.key(2), jnp.zeros((1, 4, 4, 8)))["params"]
  vq_params = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), vq_params)
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(vq_params).items()}
  codebook = np.asarray(jax.random.normal(jax.random.key(4), (1024, 8)), np.float32)
  full = {**state, **{"pixel_decoder." + k: v for k, v in torch_layout(flat).items()},
          "pixel_quantize.embedding.weight": codebook}
  cfg = json.loads(json.dumps(config))
  cfg["model"]["vq_model"]["finetune_decoder"] = True
  model, params = titok_ckpt.load(write_hub_dir(tmp_path / "ft", cfg, full), num_heads=3)
  assert model.finetune_decoder and model.vqgan_channel_mult == (1, 1, 1, 1) and model.vqgan_z_channels == 8
  images = jnp.asarray(g["images"])
  recon = jitted(model, "reconstruct")(params, images)
  assert recon.shape == (3, 32, 32, 3)
  mixed = maskgit_vqgan.mix_codes(jnp.asarray(g["decoded"]), codebook)  # the reference's logits
  np.testing.assert_allclose(np.asarray(mixed), np.einsum("bhwn,nd->bhwd", jax.nn.softmax(g["decoded"], -1), codebook),
                             rtol=1e-5, atol=1e-5)
  close(recon, jax.jit(vqgan.apply)({"params": vq_params}, mixed), tol=1e-5)
  assert jitted(model)(params, images)["recon"].shape == (3, 32, 32, 3)
  skipped, _ = titok_ckpt.load(write_hub_dir(tmp_path / "skip", cfg, full), num_heads=3, skip_pixel_decoder=True)
  assert not skipped.finetune_decoder
