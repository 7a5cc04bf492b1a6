"""Model builders: the frozen teacher, the assembled student, upcycling, per-component trainability.

Importing this package registers the ``distill_llava`` model type (students with a token-compressing projector,
distill/models/vlm.py) with transformers' Auto classes, so that ``load_vlm`` reloads them, and the ``sorted``
experts forward (distill/models/experts.py) with transformers' experts interface.
"""

from distill.models import experts
from distill.models.vlm import register

register()
experts.register()
