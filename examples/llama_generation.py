"""Greedy generation with a Llama-style transformers model whose attention runs through
flex-flash-infer, against the same model on PyTorch SDPA: the 64 new tokens must be identical.

The model is built from a config with random weights (nothing is downloaded). On a CPU the
library's reference backend runs; on a CUDA GPU with FlashInfer, its kernels (bf16).
"""
import torch
import transformers

from flex_flash_infer.integrations.transformers import register

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32

register()  # attention implementation "flex_infer"
config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  initializer_range=0.1)  # wider logits than the default: fewer near-ties
torch.manual_seed(0)
reference = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval().to(device, dtype)
ours = transformers.LlamaForCausalLM._from_config(config, attn_implementation="flex_infer").eval().to(device, dtype)
ours.load_state_dict(reference.state_dict())

prompt = torch.randint(0, config.vocab_size, (2, 24), device=device)
settings = dict(max_new_tokens=64, do_sample=False, pad_token_id=0)
with torch.no_grad():
    expected = reference.generate(prompt, **settings)
    generated = ours.generate(prompt, **settings)
print("new tokens (first sequence):", generated[0, prompt.shape[1]:].tolist()[:16], "...")
same = torch.equal(generated, expected)
print(f"identical to SDPA: {same} ({generated.shape[1] - prompt.shape[1]} new tokens x {prompt.shape[0]} sequences)")
assert generated.shape[1] == prompt.shape[1] + 64 and same
