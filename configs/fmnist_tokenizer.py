r"""A small 1D tokenizer on Fashion-MNIST (28x28 grey, patch 4 -> 49 patches, K = 32 latent tokens): TiTok,
One-D-Piece or FlexTok, for the PSNR-against-tokens comparison of the tokenizer issue.

Runs: train.py with `task = "reconstruct"` (images in [0, 1], AdamW + warmup/cosine, the model's own losses
plus an L1 pixel loss, orbax auto-resume), then eval.py --mode=recon (PSNR/SSIM at every length 1..K, a grid).

  python train.py --config configs/fmnist_tokenizer.py:tokenizer=titok --workdir workdirs/tok_titok
  python train.py --config configs/fmnist_tokenizer.py:tokenizer=one_d_piece,source=npz:../shared/data/fashion_mnist.npz --workdir W
  python train.py --config configs/fmnist_tokenizer.py:tokenizer=flextok,decoder=pixel --workdir W
  python train.py --config configs/fmnist_tokenizer.py:tokenizer=flextok,runlocal --workdir /tmp/smoke   # seconds
  python eval.py --mode=recon --config configs/fmnist_tokenizer.py:tokenizer=titok --workdir workdirs/tok_titok
  python eval.py --mode=compare --config "configs/fmnist_tokenizer.py:compare=W1;W2;W3" --workdir benchmarks/fmnist_tokenizers

Args after the colon: tokenizer (titok | one_d_piece | flextok), source (embedded:fashion_mnist | npz:PATH |
tfds:fashion_mnist), steps (3000), batch (128), lr (1e-3), seed, tokens (K, 32), decoder (FlexTok: flow |
pixel), recon_loss (l1 | l2 | l1+l2), perceptual_vit ('': or a ViT workdir, e.g. benchmarks/fmnist_vit, whose
blocks 1 and 3 give an LPIPS-style feature loss), lpips_vgg / lpips_lin ('': or real LPIPS-VGG, weight 0.1:
torchvision VGG16 weights and the lpips package's weights/v0.1/vgg.pth as .safetensors / .npz, see
tokcomp/checkpoints/lpips.py; the 28 px images are resized to lpips_resize, 64, for it), compare (eval.py
--mode=compare: workdirs joined by ';'), label (the curve's name in tables), width (128) and depth (4: blocks in
the encoder and in the decoder), runlocal (tiny model, 2 steps).
All three share the encoder/decoder width and depth (4 heads) and K. TiTok and One-D-Piece use a
cosine VQ codebook of 1024 x 12; FlexTok uses FSQ [8, 8, 8, 5, 5, 5] as the paper.
Expect: the measured table and plot are in benchmarks/fmnist_tokenizers/ (with device and date).
"""
from configs.common import parse_arg

MODELS = ("titok", "one_d_piece", "flextok")


def get_config(arg: str | None = None):
  c = parse_arg(arg, tokenizer="titok", source="embedded:fashion_mnist", steps=3000, batch=128, lr=1e-3, seed=0,
                tokens=32, decoder="flow", recon_loss="l1", perceptual_vit="", lpips_vgg="", lpips_lin="",
                lpips_resize=64, compare="", label="", width=128, depth=4, runlocal=False)
  if c.tokenizer not in MODELS:
    raise ValueError(f"configs/fmnist_tokenizer.py tokenizer={c.tokenizer!r}: must be one of {MODELS}")
  c.task = "reconstruct"
  c.model_name = c.tokenizer
  c.data = dict(source=c.source, train_split="train", test_split="test", crop_pad=0, flip=True)
  width, depth, heads = (32, 1, 2) if c.runlocal else (c.width, c.depth, 4)
  if c.model_name in ("titok", "one_d_piece"):
    c.model = dict(image_size=28, channels=1, patch_size=4, num_latent_tokens=c.tokens, token_size=12,
                   quantizer="vq", codebook_size=1024, use_l2_norm=True, commitment_cost=0.25,
                   encoder_size=None, encoder_width=width, encoder_depth=depth, encoder_heads=heads,
                   decoder_size=None, decoder_width=width, decoder_depth=depth, decoder_heads=heads)
  else:
    c.model = dict(image_size=28, channels=1, patch_size=4, num_latent_tokens=c.tokens, width=width, depth=depth,
                   num_heads=heads, mlp_dim=4 * width, decoder=c.decoder, fsq_levels=(8, 8, 8, 5, 5, 5),
                   nested_dropout="uniform", flow_steps=25)
  if c.perceptual_vit:
    from configs import fmnist_vit
    c.perceptual = dict(weights=c.perceptual_vit, model=fmnist_vit.get_config().model.to_dict(), blocks=(1, 3),
                        weight=0.1, source="embedded:fashion_mnist", image_size=28)
  if (c.lpips_vgg or c.perceptual_vit) and c.model_name == "flextok" and c.decoder == "flow":
    raise ValueError("configs/fmnist_tokenizer.py: a perceptual loss needs pixels in training, and FlexTok's flow "
                     "decoder trains on velocities (recon is None); use decoder=pixel")
  if c.lpips_vgg:
    if c.perceptual_vit:
      raise ValueError("configs/fmnist_tokenizer.py: perceptual_vit and lpips_vgg are two perceptual losses; pick one")
    c.perceptual = dict(kind="lpips_vgg", weights=c.lpips_vgg, lin_weights=c.lpips_lin, weight=0.1,
                        resize=c.lpips_resize)
  c.label = c.label or c.model_name + (f" ({c.decoder} decoder)" if c.model_name == "flextok" else "")
  c.recon_weight = 1.0
  c.warmup_steps = max(1, min(200, c.steps // 10))
  c.weight_decay = 1e-4
  c.grad_clip = 1.0
  c.log_every = 50
  c.ckpt_every = 500
  c.keep_ckpts = 2
  c.eval_batch = 250
  c.eval_limit = 1000  # test images for PSNR/SSIM (each length is one forward pass over them)
  k = c.tokens  # eval.py --mode=recon: these kept lengths (a flow decoder costs flow_steps passes per length)
  c.eval_lengths = tuple(sorted({1, 2, 3, 4, 6} | {max(1, k * i // 8) for i in range(1, 9)}))
  if c.runlocal:
    c.model.update(num_latent_tokens=min(c.tokens, 8))
    if c.model_name == "flextok":
      c.model.update(flow_steps=2)
    else:
      c.model.update(codebook_size=64)
    c.steps, c.batch, c.warmup_steps, c.log_every, c.ckpt_every = 2, 16, 1, 1, 1
    c.eval_batch, c.eval_limit = 64, 64
  return c
