"""The one table that maps a linear's attribute name to its role in a transformer block.

Roles are derived from the module's last name component; everything else about a site
(block, fusion group, order) is derived from the traced graph.
"""

ROLE_BY_NAME: dict[str, str] = {
    # Llama, Mistral, Qwen2, Gemma, Phi-3
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "qkv_proj": "qkv",
    "gate_proj": "gate",
    "up_proj": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down",
    # GPT-2
    "c_attn": "qkv",
    "c_fc": "fc_in",
    # BERT
    "query": "q",
    "key": "k",
    "value": "v",
    # heads
    "lm_head": "lm_head",
}

# Names whose role depends on the enclosing module: (parent name, own name) -> role.
ROLE_BY_PARENT_AND_NAME: dict[tuple[str, str], str] = {
    ("attn", "c_proj"): "o",
    ("mlp", "c_proj"): "fc_out",
    ("output", "dense"): "o",  # BERT attention.output.dense
    ("intermediate", "dense"): "fc_in",
    ("pooler", "dense"): "pooler",
}


def role_of(qualified_name: str) -> str:
    """Role of the linear at ``qualified_name`` (``linear`` when the table does not know it)."""
    parts = qualified_name.split(".")
    name = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    grandparent = parts[-3] if len(parts) > 2 else ""
    if (parent, name) == ("output", "dense") and grandparent != "attention":
        return "fc_out"  # BERT layer.N.output.dense is the FFN output
    return ROLE_BY_PARENT_AND_NAME.get((parent, name)) or ROLE_BY_NAME.get(name, "linear")
