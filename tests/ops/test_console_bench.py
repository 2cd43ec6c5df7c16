"""`mesh ops console-bench`'s measure: every console page sends as many Redis commands with twice the
jobs and dead letters (past every page's budget) as with the first amount: paged, never a scan."""

from __future__ import annotations

from mesh.ops.web import bench


def test_each_console_page_sends_the_same_redis_commands_whatever_the_number_of_jobs_and_dead_letters(settings):
    result = bench.run(settings, [(1_100, 1_100), (2_300, 2_300)])
    small, large = (size["pages"] for size in result["sizes"])
    assert small.keys() == large.keys() and len(small) == 15
    assert {"/jobs?q=TRACE", "/jobs?q=NO-TRACE", "/limits"} <= small.keys()
    grew = {page: (small[page]["commands"], large[page]["commands"]) for page in small
            if small[page]["commands"] != large[page]["commands"]}
    assert grew == {}
    assert all(page["commands"] > 0 for page in large.values())  # the count sees every page's reads
