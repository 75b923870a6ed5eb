"""Reading the audit trail: row history and timelines (:mod:`~threadline.explore.query`,
:mod:`~threadline.explore.timeline_query`), complete paging, the trace tree, the row as it was,
exports, field diffs, recorded actions and reverting what a request did."""
