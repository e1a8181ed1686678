"""The stage-1 converter (tokenprune/models/stage1.py) on tiny stand-ins with the real sources' file layout.

Stand-ins: a Vicuna-like Llama folder (sharded `pytorch_model-0000k-of-00002.bin` + index, config,
generation config, tokenizer), an openai/clip-vit-large-patch14-336-like folder (a full CLIPModel,
text half included, as `pytorch_model.bin`, with its preprocessor_config.json) and a stage-1 pretrain
folder (`mm_projector.bin` with the trainer's `model.mm_projector.{0,2}.*` names + config.json).
The converted checkpoint is checked against the sources with plain HF forwards.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tokenprune.models.llava import LlavaAdapter
from tokenprune.models.stage1 import convert, load_projector

VISION_WIDTH, LLM_WIDTH = 32, 48


def _vicuna_tokenizer():
    """A tiny BPE with Vicuna's specials only (<unk>, <s>, </s>; no pad, no <image>), <s> prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["USER: What color is the square? ASSISTANT: red"] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _vicuna_like(folder):
    """A tiny Llama written in the layout of lmsys/vicuna-7b-v1.5 (two .bin shards and their index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _vicuna_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLM_WIDTH,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2]}
    shards["pytorch_model-00002-of-00002.bin"] = names[len(names) // 2 :]
    folder.mkdir()
    weight_map = {}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / file)
        weight_map.update(dict.fromkeys(keys, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    config.save_pretrained(folder)
    model.generation_config.update(do_sample=True, temperature=0.9, top_p=0.6)  # as Vicuna's release
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def _clip_like(folder):
    """A tiny full CLIPModel in the layout of openai/clip-vit-large-patch14-336 (.bin + preprocessor)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": VISION_WIDTH,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 24,
            "patch_size": 4,
        },
        projection_dim=16,
    )
    torch.manual_seed(2)
    model = CLIPModel(config).eval()
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    config.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(
        folder
    )
    return model


def _pretrain_like(folder):
    """A stage-1 pretrain folder: mm_projector.bin (mlp2x_gelu, trainer names) + its config.json."""
    g = torch.Generator().manual_seed(3)
    state = {
        "model.mm_projector.0.weight": torch.randn(LLM_WIDTH, VISION_WIDTH, generator=g) * 0.1,
        "model.mm_projector.0.bias": torch.randn(LLM_WIDTH, generator=g) * 0.1,
        "model.mm_projector.2.weight": torch.randn(LLM_WIDTH, LLM_WIDTH, generator=g) * 0.1,
        "model.mm_projector.2.bias": torch.randn(LLM_WIDTH, generator=g) * 0.1,
    }
    folder.mkdir()
    torch.save(state, folder / "mm_projector.bin")
    config = {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": VISION_WIDTH, "mm_vision_select_layer": -2}
    (folder / "config.json").write_text(json.dumps(config))
    return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    llm, tokenizer = _vicuna_like(root / "vicuna")
    clip = _clip_like(root / "clip")
    projector = _pretrain_like(root / "pretrain")
    out = convert(
        str(root / "vicuna"), str(root / "clip"), str(root / "pretrain"), root / "out", dtype="float32"
    )
    return out, llm, tokenizer, clip, projector


def test_converted_checkpoint_holds_the_sources_weights(converted):
    out, llm, _, clip, projector = converted
    adapter = LlavaAdapter.from_pretrained(str(out), dtype="float32", device="cpu", image_aspect="pad")
    model = adapter.model
    old = llm.config.vocab_size
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert embed.shape[0] % 64 == 0 and embed.shape[0] >= old + 2 and len(adapter.tokenizer) == old + 2
    assert torch.equal(embed[:old], llm.get_input_embeddings().weight)
    assert torch.equal(head[:old], llm.lm_head.weight)
    torch.testing.assert_close(
        embed[old:], llm.get_input_embeddings().weight.mean(0).expand(embed.shape[0] - old, -1)
    )
    image_id = adapter.tokenizer.convert_tokens_to_ids("<image>")
    assert (
        model.config.image_token_id == image_id
        and image_id >= old
        and adapter.tokenizer.pad_token_id is not None
    )
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == clip.vision_model.state_dict().keys()  # the text half is dropped
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(tower[name], tensor), name
    mlp = model.model.multi_modal_projector
    assert torch.equal(mlp.linear_1.weight, projector["model.mm_projector.0.weight"])
    assert torch.equal(mlp.linear_2.bias, projector["model.mm_projector.2.bias"])
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (-2, "default")
    assert json.loads((out / "tokenprune_stage1.json").read_text())["projector"].endswith("pretrain")
    generation = model.generation_config
    assert not generation.do_sample and generation.pad_token_id == adapter.tokenizer.pad_token_id


def test_converted_checkpoint_forward_equals_the_sources(converted):
    """Text: the LLM's logits are Vicuna's (plain HF forward). Image: the visual tokens the LLM receives
    are LLaVA's mlp2x_gelu of CLIP's layer -2 patch features, computed here from the source weights."""
    out, llm, tokenizer, clip, projector = converted
    adapter = LlavaAdapter.from_pretrained(str(out), dtype="float32", device="cpu", image_aspect="pad")
    ids = tokenizer("USER: What color is the square? ASSISTANT:", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = adapter.model(input_ids=ids).logits[..., : llm.config.vocab_size]
        want = llm(input_ids=ids).logits
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
        pixels = adapter.preprocess([Image.new("RGB", (30, 20), (200, 40, 40))])
        features = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = F.gelu(
            features @ projector["model.mm_projector.0.weight"].T + projector["model.mm_projector.0.bias"]
        )
        expected = (
            hidden @ projector["model.mm_projector.2.weight"].T + projector["model.mm_projector.2.bias"]
        )
        got = adapter.encode_images(pixels).features[0]  # [N, d], reducer none
    torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-5)


def test_projector_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no mm_projector\.bin"):
        load_projector(tmp_path)
    torch.save({"model.mm_projector.weight": torch.zeros(2, 2)}, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="expected mm_projector"):
        load_projector(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match=r"only LLaVA-1\.5's mlp2x_gelu"):
        load_projector(tmp_path)
