"""The context core: who acts (:mod:`~threadline.core.actor`), the audit context and its scope
(:mod:`~threadline.core.context`), its one encoding (:mod:`~threadline.core.codec`,
:mod:`~threadline.core.fields`), the records read back (:mod:`~threadline.core.records`) and the
exceptions (:mod:`~threadline.core.errors`). It knows no transport and runs no query."""
