"""The test tiers cannot drift: every test that starts a studio server or a browser carries the
`server` marker (so `make test-fast` never starts one). Found from the source: a test starts a
server when it, a fixture or a helper it names starts one, or uses a fixture that does."""

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# A studio left running: the studio conftest's Server, Gradio's launch, app.py in a Popen, uvicorn;
# pytest-playwright's `page` fixture opens a browser.
STARTS = re.compile(r"\bServer\(|\.launch\(|Popen\(\s*\[sys\.executable,\s*\"app\.py\"|\buvicorn\.")
BROWSER_FIXTURES = {"page"}


def functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def fixtures_used(function: ast.FunctionDef) -> set[str]:
    return {arg.arg for arg in function.args.args + function.args.kwonlyargs}


def names_used(function: ast.FunctionDef) -> set[str]:
    return {node.id for node in ast.walk(function) if isinstance(node, ast.Name)}


def starters(source: str, fixtures: set[str]) -> set[str]:
    """The functions of a module that start a server: by their own code, by a fixture that does
    (`fixtures`: those of the conftest files), or by a fixture or helper of this module that does."""
    defined = functions(ast.parse(source))
    found = {name for name, f in defined.items() if STARTS.search(ast.get_source_segment(source, f))}
    while True:
        more = {name for name, f in defined.items()
                if fixtures_used(f) & (fixtures | found) or names_used(f) & found} - found
        if not more:
            return found
        found |= more


def marks(node: ast.AST) -> set[str]:
    """The X of every pytest.mark.X (or pytest.mark.X(...)) in a decorator or a pytestmark value."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"}


def server_fixtures() -> set[str]:
    """The fixtures of the tests' conftest files that start a server, and pytest-playwright's."""
    known = set(BROWSER_FIXTURES)
    for conftest in sorted(TESTS.rglob("conftest.py")):
        known |= starters(conftest.read_text(), known)
    return known


def unmarked_server_tests(path: Path, known: set[str]) -> list[str]:
    source = path.read_text()
    tree = ast.parse(source)
    module = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            module |= marks(node.value)
    defined = functions(tree)
    return sorted(name for name in starters(source, known) if name.startswith("test_")
                  and "server" not in module | set().union(*map(marks, defined[name].decorator_list)))


def server_tests(path: Path, known: set[str]) -> set[str]:
    return {name for name in starters(path.read_text(), known) if name.startswith("test_")}


def test_every_test_that_starts_a_server_is_marked_server():
    known = server_fixtures()
    unmarked = {str(path.relative_to(TESTS)): names for path in sorted(TESTS.rglob("test_*.py"))
                if (names := unmarked_server_tests(path, known))}
    assert unmarked == {}, "mark these `server` (pytestmark = pytest.mark.server, or per test)"


def test_the_check_sees_the_servers_it_must():
    """The tests it must find, so that a change of the studio's fixtures cannot blind it; app.py
    run to a refused start (it exits) is no server."""
    known = server_fixtures()
    assert {"studio_server", "studio_url", "embedded_server", "client", "page"} <= known
    assert server_tests(TESTS / "test_cuda.py", known) == {"test_the_studio_on_cuda_answers_through_gradio_client"}
    faults = server_tests(TESTS / "studio" / "test_faults.py", known)  # in-process launch, and python app.py
    assert {"test_out_of_memory_shows_one_message_and_the_next_request_works",
            "test_cancelling_an_answer_frees_the_slot"} <= faults
    assert server_tests(TESTS / "studio" / "test_login.py", known)  # a module fixture of its own
    assert server_tests(TESTS / "studio" / "test_browser.py", known)
    assert not server_tests(TESTS / "test_safe_defaults.py", known)
    assert not server_tests(TESTS / "studio" / "test_services.py", known)
