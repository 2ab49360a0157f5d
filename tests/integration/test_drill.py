"""Issue 18's acceptance drill on a real TorchServe, with short steps: lenet 2.0 deployed,
shadowing 20% of the requests (then not), routed 10% then 50%, promoted, rolled back, promoted
again and 1.0 retired, under 16 keep-alive clients (REST, OIP and gRPC; none retrying) sending
unpinned requests throughout."""

from kiln.loadtests.studies import drill

NAME = "lenet"
HOLD_S = 2.0


def test_the_version_drill_loses_no_request_and_every_answer_is_routed(archives, tmp_path):
    drill.prepare(tmp_path, archives[NAME])
    found, shadow = drill.drill(tmp_path, clients=16, hold=HOLD_S, warm=False)
    names = [step.name for step in drill.STEPS]
    assert [(r.name, r.failed, r.resets, r.misrouted) for r in found] == [
        (name, 0, 0, 0) for name in names]
    assert all(r.requests > 0 for r in found)
    # The steps that let a version in or shut one out took effect within 1 s of versions.json
    # changing; the others changed no version's lot.
    assert [r.name for r in found if r.effect_s is not None] == [
        "route 90/10", "promote 2.0", "rollback", "promote 2.0"]
    assert [(r.name, r.effect_s) for r in found
            if r.effect_s is not None and r.effect_s > drill.TAKE_EFFECT_S] == []
    # What each step's answers came from, gRPC's too (the misrouted check above is per
    # answer, by when it was sent).
    assert [sorted(r.by_version) for r in found] == [
        ["1.0"], ["1.0"], ["1.0"], ["1.0"], ["1.0", "2.0"], ["1.0", "2.0"], ["1.0", "2.0"],
        ["1.0", "2.0"], ["1.0", "2.0"], ["2.0"]]
    # The shadow: every sample Kiln counted (by outcome) is an answer marked shadowed, and its
    # agreement is the one computed offline on those answers' inputs.
    outcomes = shadow.outcomes()
    assert sum(outcomes.values()) == sum(shadow.marked.values())
    assert sorted(shadow.marked) == ["grpc", "oip", "rest"]
    assert shadow.offline[1] == sum(shadow.marked.values())
    assert abs(shadow.kiln_agreement() - shadow.offline_agreement()) <= 0.5, shadow.line()
