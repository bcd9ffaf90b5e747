"""FLUX.2's transformer (Flux2Transformer2DModel: FLUX.2 [klein] 4B and 9B) in Black Forest Labs' original
layout, the names of BFL's single files and of ComfyUI's Flux.2 model, as `keymap_flux.Layout`.

As in Flux.1, a double block's image and text attention each compute q, k and v with one `qkv` linear (the
diffusers weights concatenated on the output axis in that order), the final modulation holds shift then scale
where diffusers' `norm_out.linear` holds scale then shift, and the q/k RMSNorms' weights are called `scale`.
Unlike Flux.1, a single block's fused input is one diffusers module too (`attn.to_qkv_mlp_proj`), and the
modulation layers are three, shared by all blocks. The names are diffusers' conversion script's
(scripts/convert_flux2_to_diffusers.py) read the other way.
"""
from __future__ import annotations

from .keymap_flux import Layout

LAYOUT = Layout(
    top={"x_embedder": "img_in", "context_embedder": "txt_in",
         "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
         "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
         "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
         "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
         "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
         "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
         "single_stream_modulation.linear": "single_stream_modulation.lin",
         "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"},
    double={"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
            "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
            "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
            "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"},
    double_fused={"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                  "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
    single={"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
            "attn.norm_k": "norm.key_norm"},
    single_fused={})
