"""Vocabulary surgery: row copying, new-row init, padding, sharding, and pair checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cnllama_jax import model
from cnllama_jax import sharding as shd
from cnllama_jax import vocab
from cnllama_jax.config import preset


@pytest.fixture(scope="module")
def tiny():
  cfg = preset("tiny", vocab_size=99)  # hidden 64, padded to 128 rows
  return cfg, model.init_params(cfg, jax.random.key(0))


def bits(x):
  x = np.asarray(x)
  return x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize])


@pytest.mark.parametrize("init", ["normal", "mean"])
def test_old_rows_are_copied_bit_identically_and_padding_is_zero(tiny, init):
  cfg, params = tiny
  new_cfg, new = vocab.resize_vocab(cfg, params, 150, init=init, rng=jax.random.key(1))
  assert (new_cfg.vocab_size, new_cfg.padded_vocab_size) == (150, 256)
  assert new["embed_tokens"].shape == (256, 64) and new["lm_head"].shape == (64, 256)
  np.testing.assert_array_equal(bits(new["embed_tokens"])[:99], bits(params["embed_tokens"])[:99])
  np.testing.assert_array_equal(bits(new["lm_head"])[:, :99], bits(params["lm_head"])[:, :99])
  assert not np.asarray(new["embed_tokens"])[150:].any()
  assert not np.asarray(new["lm_head"])[:, 150:].any()
  assert np.asarray(new["embed_tokens"])[99:150].any()
  assert new["norm"]["scale"] is params["norm"]["scale"]  # other params are shared, untouched
  assert new["embed_tokens"].dtype == params["embed_tokens"].dtype


def test_normal_rows_have_std_0_02(tiny):
  cfg, params = tiny
  _, new = vocab.resize_vocab(cfg, params, 2099, init="normal", rng=jax.random.key(1))
  rows = np.asarray(new["embed_tokens"])[99:2099]  # 2000 x 64 samples
  cols = np.asarray(new["lm_head"])[:, 99:2099]
  for x in (rows, cols):
    assert abs(x.std() - 0.02) < 0.0015
    assert abs(x.mean()) < 5e-4
  assert not np.allclose(rows, cols.T)  # embedding and head use different keys


def test_mean_rows_equal_the_mean_of_old_rows(tiny):
  cfg, params = tiny
  _, new = vocab.resize_vocab(cfg, params, 150, init="mean")  # no rng needed without noise
  old_e = np.asarray(params["embed_tokens"], np.float64)[:99]
  old_h = np.asarray(params["lm_head"], np.float64)[:, :99]
  rows = np.asarray(new["embed_tokens"])[99:150]
  cols = np.asarray(new["lm_head"])[:, 99:150]
  assert (rows == rows[0]).all() and (cols == cols[:, :1]).all()
  np.testing.assert_allclose(rows[0], old_e.mean(axis=0), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(cols[:, 0], old_h.mean(axis=1), rtol=1e-5, atol=1e-8)

  _, noisy = vocab.resize_vocab(cfg, params, 2099, init="mean", noise_std=0.01,
                                rng=jax.random.key(2))
  delta = np.asarray(noisy["embed_tokens"], np.float64)[99:2099] - old_e.mean(axis=0)
  assert abs(delta.std() - 0.01) < 0.0008 and abs(delta.mean()) < 3e-4


def test_padded_size_is_a_multiple_and_numpy_bf16_stays_numpy_bf16():
  cfg = preset("tiny", vocab_size=32000)
  rng = np.random.default_rng(0)
  params = {"embed_tokens": rng.normal(0, 0.02, (32000, 64)).astype(jnp.bfloat16),
            "lm_head": rng.normal(0, 0.02, (64, 32000)).astype(jnp.bfloat16)}
  new_cfg, new = vocab.resize_vocab(cfg, params, 49953, rng=jax.random.key(0),
                                    vocab_multiple=1024)
  assert new_cfg.padded_vocab_size == 50176  # 49 * 1024
  assert new_cfg.vocab_multiple == 1024
  assert isinstance(new["embed_tokens"], np.ndarray)
  assert new["embed_tokens"].dtype == jnp.bfloat16 and new["lm_head"].dtype == jnp.bfloat16
  assert new["embed_tokens"].shape == (50176, 64) and new["lm_head"].shape == (64, 50176)
  np.testing.assert_array_equal(bits(new["embed_tokens"])[:32000], bits(params["embed_tokens"]))
  np.testing.assert_array_equal(bits(new["lm_head"])[:, :32000], bits(params["lm_head"]))
  assert not np.asarray(new["embed_tokens"], np.float32)[49953:].any()
  assert not np.asarray(new["lm_head"], np.float32)[:, 49953:].any()
  # Default multiple (128): 49953 and 49954 both pad to 391 * 128.
  assert vocab.resize_vocab(cfg, params, 49953, init="mean")[0].padded_vocab_size == 50048


def test_logits_of_old_ids_are_unchanged(tiny):
  cfg, params = tiny
  new_cfg, new = vocab.resize_vocab(cfg, params, 150, rng=jax.random.key(1))
  ids = np.array([[1, 5, 98, 0, 42, 7], [3, 3, 60, 2, 97, 11]], np.int32)
  before = np.asarray(model.logits(cfg, params, ids))
  after = np.asarray(model.logits(new_cfg, new, ids))
  assert before.shape == (2, 6, 99) and after.shape == (2, 6, 150)
  np.testing.assert_array_equal(after[..., :99], before)  # raw logits: new rows add columns only


def test_tied_embeddings_resize_only_the_embedding():
  cfg = preset("tiny", vocab_size=99, tie_word_embeddings=True)
  params = model.init_params(cfg, jax.random.key(0))
  new_cfg, new = vocab.resize_vocab(cfg, params, 150, rng=jax.random.key(1))
  assert "lm_head" not in new and new["embed_tokens"].shape == (256, 64)
  np.testing.assert_array_equal(bits(new["embed_tokens"])[:99], bits(params["embed_tokens"])[:99])


def test_sharded_resize_matches_one_device_and_stays_sharded(tiny):
  cfg, params = tiny
  mesh = shd.make_mesh((1, 2, 4))
  rules = shd.DEFAULT_RULES
  placed = shd.place(params, shd.param_shardings(model.abstract_params(cfg), mesh, rules))
  assert placed["embed_tokens"].sharding.spec == P("tensor", "fsdp")
  new_cfg, sharded = vocab.resize_vocab(cfg, placed, 150, rng=jax.random.key(3))
  _, single = vocab.resize_vocab(cfg, params, 150, rng=jax.random.key(3))
  want = shd.param_shardings(model.abstract_params(new_cfg), mesh, rules)
  for name, spec, shard_shape in [("embed_tokens", P("tensor", "fsdp"), (64, 32)),
                                  ("lm_head", P("fsdp", "tensor"), (32, 64))]:
    out = sharded[name]
    assert isinstance(out.sharding, NamedSharding) and out.sharding.spec == spec
    assert out.sharding.is_equivalent_to(want[name], 2)
    assert {s.data.shape for s in out.addressable_shards} == {shard_shape}
    assert len(out.sharding.device_set) == 8
    np.testing.assert_array_equal(bits(out), bits(single[name]))
  assert vocab.mesh_vocab_multiple(mesh, rules) == 512
  with pytest.raises(ValueError, match=r"padded vocabulary 150 is not divisible by the 4 shards"):
    vocab.resize_vocab(cfg, placed, 150, rng=jax.random.key(3), vocab_multiple=2)


@pytest.mark.parametrize("model_vocab, tok_vocab, strict, message", [
    (150, 99, True, r"^tokenizer has 99 pieces but the model's vocabulary is 150; "),
    (49953, 32000, True, r"^tokenizer has 32000 pieces but the model's vocabulary is 49953; "),
    (49953, 49954, True, r"model's vocabulary is 49953 \(Chinese-LLaMA\) but the tokenizer has "
     r"49954 pieces \(Chinese-Alpaca\): the Chinese-LLaMA tokenizer \(49953 pieces\) goes with "
     r"Chinese-LLaMA .*Chinese-Alpaca tokenizer \(49954, with \[PAD\]\) with Chinese-Alpaca"),
    (49954, 49953, True, r"model's vocabulary is 49954 \(Chinese-Alpaca\) but the tokenizer has "
     r"49953 pieces \(Chinese-LLaMA\): the Chinese-LLaMA tokenizer \(49953 pieces\) goes with"),
    (49954, 49953, False, r"vocabulary is 49954 \(Chinese-Alpaca\) but the tokenizer has 49953"),
])
def test_incompatible_pairs_raise_one_line_errors(model_vocab, tok_vocab, strict, message):
  with pytest.raises(ValueError, match=message) as err:
    vocab.check_pair(model_vocab, tok_vocab, strict=strict)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_vocab, tok_vocab, strict", [
    (32000, 32000, True), (32000, 49953, True), (49953, 49953, True), (49954, 49954, True),
    (32000, 49954, True),  # LLaMA + Chinese-Alpaca LoRA: the paper's merge script resizes so
    (49953, 49954, False),  # SFT of Chinese-LLaMA with the Alpaca tokenizer (adds [PAD])
    (99, 99, True), (99, 150, True), (49953, 60000, True),
])
def test_accepted_pairs(model_vocab, tok_vocab, strict):
  vocab.check_pair(model_vocab, tok_vocab, strict=strict)


def test_resize_vocab_checks_its_arguments(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match=r"tokenizer has 98 pieces but the model's vocabulary is 99"):
    vocab.resize_vocab(cfg, params, 98, init="mean")
  with pytest.raises(ValueError, match=r"init='zeros'; expected 'normal' or 'mean'"):
    vocab.resize_vocab(cfg, params, 150, init="zeros")
  with pytest.raises(ValueError, match=r"init='subword_mean' needs sub_pieces .*vocab\.base_tok"):
    vocab.resize_vocab(cfg, params, 101, init="subword_mean")
  with pytest.raises(ValueError, match=r"sub_pieces has 1 entries; expected one per new row "
                                       r"\(2 = 101 - 99\)"):
    vocab.resize_vocab(cfg, params, 101, init="subword_mean", sub_pieces=[[1]])
  with pytest.raises(ValueError, match=r"sub_pieces holds id 99, not a base id \(base vocabulary "
                                       r"99\)"):
    vocab.resize_vocab(cfg, params, 101, init="subword_mean", sub_pieces=[[1], [3, 99]])
  with pytest.raises(ValueError, match=r"needs an rng key"):
    vocab.resize_vocab(cfg, params, 150, init="normal")
  llama_cfg = preset("tiny", vocab_size=49953)
  with pytest.raises(ValueError, match=r"pass strict=False only to resize Chinese-LLaMA"):
    vocab.resize_vocab(llama_cfg, {}, 49954, init="mean")


def test_strict_false_resizes_chinese_llama_to_alpaca():
  cfg = preset("tiny", vocab_size=49953, hidden_size=8, num_attention_heads=2)
  params = {"embed_tokens": np.ones((50048, 8), np.float32),
            "lm_head": np.ones((8, 50048), np.float32)}
  new_cfg, new = vocab.resize_vocab(cfg, params, 49954, init="mean", strict=False)
  assert new_cfg.vocab_size == 49954 and new_cfg.padded_vocab_size == 50048
  assert (new["embed_tokens"][:49953] == 1).all() and not new["embed_tokens"][49954:].any()
  np.testing.assert_allclose(new["embed_tokens"][49953], 1.0, rtol=1e-7)  # XLA: 1 ulp off


def test_row_masks():
  cfg = preset("tiny", vocab_size=150)  # padded to 256
  real = vocab.vocab_row_mask(cfg)
  assert real.shape == (256,) and real.dtype == bool and real.sum() == 150
  assert real[149] and not real[150]
  new = vocab.new_rows_mask(99, cfg)
  assert new.shape == (256,) and new.sum() == 51
  assert not new[98] and new[99] and new[149] and not new[150]
  with pytest.raises(ValueError, match=r"old_vocab=151 must be in \[0, vocab_size=150\]"):
    vocab.new_rows_mask(151, cfg)


# --- subword_mean: each new row from the base rows of its sub-pieces ----------------------------

SUB_PIECES = [[5, 7], [98], [], [3, 3, 60]]  # new ids 99, 100, 101, 102


def test_subword_mean_rows_are_the_mean_of_their_sub_piece_rows(tiny):
  cfg, params = tiny
  new_cfg, new = vocab.resize_vocab(cfg, params, 103, init="subword_mean", sub_pieces=SUB_PIECES)
  assert (new_cfg.vocab_size, new_cfg.padded_vocab_size) == (103, 128)
  e = np.asarray(params["embed_tokens"], np.float64)  # [128, 64]
  h = np.asarray(params["lm_head"], np.float64)  # [64, 128]
  want_e = [(e[5] + e[7]) / 2, e[98], e[:99].mean(axis=0), (2 * e[3] + e[60]) / 3]
  want_h = [(h[:, 5] + h[:, 7]) / 2, h[:, 98], h[:, :99].mean(axis=1), (2 * h[:, 3] + h[:, 60]) / 3]
  rows, cols = np.asarray(new["embed_tokens"]), np.asarray(new["lm_head"])
  for k in range(4):
    np.testing.assert_allclose(rows[99 + k], want_e[k], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cols[:, 99 + k], want_h[k], rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(bits(rows[100]), bits(params["embed_tokens"][98]))  # one piece
  np.testing.assert_array_equal(bits(rows)[:99], bits(params["embed_tokens"])[:99])
  np.testing.assert_array_equal(bits(cols)[:, :99], bits(params["lm_head"])[:, :99])
  assert not rows[103:].any() and not cols[:, 103:].any()


def test_subword_mean_on_a_sharded_padded_table(tiny):
  cfg, params = tiny
  mesh = shd.make_mesh((1, 2, 4))  # 8 fake devices; vocab over `tensor` (4), embed over fsdp
  rules = shd.DEFAULT_RULES
  multiple = vocab.mesh_vocab_multiple(mesh, rules)  # 512
  placed = shd.place(params, shd.param_shardings(model.abstract_params(cfg), mesh, rules))
  new_cfg, sharded = vocab.resize_vocab(cfg, placed, 103, init="subword_mean",
                                        sub_pieces=SUB_PIECES, vocab_multiple=multiple)
  _, single = vocab.resize_vocab(cfg, params, 103, init="subword_mean", sub_pieces=SUB_PIECES,
                                 vocab_multiple=multiple)
  assert new_cfg.padded_vocab_size == 512
  want = shd.param_shardings(model.abstract_params(new_cfg), mesh, rules)
  for name in ("embed_tokens", "lm_head"):
    out = sharded[name]
    assert out.sharding.is_equivalent_to(want[name], 2) and len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(single[name]), rtol=1e-6, atol=1e-9)
  e = np.asarray(params["embed_tokens"], np.float64)
  rows = np.asarray(sharded["embed_tokens"])
  np.testing.assert_allclose(rows[99], (e[5] + e[7]) / 2, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(bits(rows)[:99], bits(params["embed_tokens"])[:99])
  assert not rows[103:].any() and not np.asarray(sharded["lm_head"])[:, 103:].any()


def test_sentencepiece_sub_pieces_are_the_base_split(tmp_path):
  from tests.test_tokenizer import hand_model, write_model  # pylint: disable=import-outside-toplevel
  from cnllama_jax import tokenizer as tk  # pylint: disable=import-outside-toplevel
  # base ids: <unk> <s> </s> = 0-2, bytes <0x00>..<0xFF> = 3-258, then ▁ a b ab = 259-262
  base = write_model(tmp_path / "base.model",
                     hand_model([("\u2581", -1), ("a", -2), ("b", -3), ("ab", -4)]))
  added = write_model(tmp_path / "zh.model", hand_model([("\u2581ab", -1), ("中", -2), ("a", -3)]))
  tk.merge(base, added, tmp_path / "merged", pad_piece="[PAD]")  # 263 ▁ab, 264 中, 265 [PAD]
  split = tk.sub_pieces(base, tmp_path / "merged", 263)
  # "[PAD]": 5 byte pieces; "中" = E4 B8 AD: byte pieces 3 + 0xE4, ...
  assert split == [[259, 262], [3 + 0xE4, 3 + 0xB8, 3 + 0xAD],
                   [3 + ord(c) for c in "[PAD]"]]
  with pytest.raises(ValueError, match=r"base\.model: base tokenizer has 263 pieces but the base "
                                       r"model's embedding has 99 rows"):
    tk.sub_pieces(base, tmp_path / "merged", 99)
  with pytest.raises(ValueError, match=r"merged: its first 262 pieces are not those of .*zh\.model"):
    tk.sub_pieces(tmp_path / "zh.model", tmp_path / "merged", len(tk.load_model_proto(added).pieces))
