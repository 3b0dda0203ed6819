"""Exercise checkers: call the learner's function, compare with the reference, say what differs.

One module per chapter (``ch00`` ... ``ch10``; chapter 09 has none) around the shared ``core.run_check``;
every public name is re-exported here, so ``from utils.checks import check_pack`` and
``checks.check_lora_forward(...)`` work as they always did.

Every checker behaves the same way:

* not attempted (the function still raises the stub's ``NotImplementedError``): a friendly line, no
  exception, returns ``None``, so the notebook runs on. A function that has a body but still holds the
  stub's ``raise`` line is told to delete that line (also ``None``: its code never ran);
* wrong: says what differs (type, shape, scale, which case, which row) without giving the answer, returns
  ``False``. An exception inside the learner's code is reported with the learner's own line; a result the
  check cannot use is described (its type, shape, dtype), never reported as the learner's crash;
* right: says so, returns ``True``.

The learner's function always gets deep copies of its inputs; one that changes them in place is told so,
and the reference is computed on untouched inputs.
"""

from utils.checks.ch00 import check_param_count, count_llama_params_reference
from utils.checks.ch01 import (
    check_causal_lm_loss,
    check_labels_from_ids,
    check_pack,
    labels_from_ids_reference,
)
from utils.checks.ch02 import (
    check_full_finetuning_bytes,
    check_make_bitfit,
    full_finetuning_bytes_reference,
    make_bitfit_reference,
)
from utils.checks.ch03 import check_lora_count, check_lora_forward, check_rank_k_approx
from utils.checks.ch04 import check_seq_cls_lora_config, check_trainable_count
from utils.checks.ch05 import check_blockwise_absmax, check_constant_bits, check_nf4_block
from utils.checks.ch06 import check_freeze_all_but_head, check_freeze_bottom_layers, check_unfrozen_layers
from utils.checks.ch07 import (
    check_accumulation_loss,
    check_checkpointed_forward,
    check_layer_activation_bytes,
)
from utils.checks.ch08 import (
    check_early_stopper,
    check_perplexity_from_logits,
    check_sliding_window_perplexity,
)
from utils.checks.ch10 import adapter_bytes_reference, check_adapter_bytes, check_logits_agree
from utils.checks.core import CheckFailed, run_check

__all__ = [
    "adapter_bytes_reference",
    "check_accumulation_loss",
    "check_adapter_bytes",
    "check_blockwise_absmax",
    "check_causal_lm_loss",
    "check_checkpointed_forward",
    "check_constant_bits",
    "check_early_stopper",
    "check_freeze_all_but_head",
    "check_freeze_bottom_layers",
    "check_full_finetuning_bytes",
    "check_labels_from_ids",
    "check_layer_activation_bytes",
    "check_logits_agree",
    "check_lora_count",
    "check_lora_forward",
    "check_make_bitfit",
    "check_nf4_block",
    "check_pack",
    "check_param_count",
    "check_perplexity_from_logits",
    "check_rank_k_approx",
    "check_seq_cls_lora_config",
    "check_sliding_window_perplexity",
    "check_trainable_count",
    "check_unfrozen_layers",
    "CheckFailed",
    "count_llama_params_reference",
    "full_finetuning_bytes_reference",
    "labels_from_ids_reference",
    "make_bitfit_reference",
    "run_check",
]
