from dyn.deploy.bringup import is_this_machine


def test_head_address_is_recognised_as_this_machine():
    assert is_this_machine("127.0.0.1") and is_this_machine("localhost")
    assert not is_this_machine("192.0.2.1")  # TEST-NET-1: never a local interface here
    assert not is_this_machine("no-such-host.invalid")
