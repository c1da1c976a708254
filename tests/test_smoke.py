import park


def test_submit_and_result(service):
    with service:
        a = park.submit("park_test_tasks:add", 1, 2)
        b = park.submit("park_test_tasks:add", 3, 4, when=a.iscompleted)
    assert a.result(timeout=30) == 3
    assert b.result(timeout=30) == 7
