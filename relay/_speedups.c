/* relay._speedups: two byte scans of the per-chunk path, in C.
 *
 * Each replaces a pure-Python function of relay/speedups.py, which documents them, is used
 * when this module was not built (no C compiler), and is the reference the tests compare
 * these with (tests/test_speedups.py). They take one bytes object, keep no state and touch
 * no other object: the per-chunk path calls each once per chunk, where the chain of
 * ``bytes.partition`` calls it replaces (about 1,000 instructions each on CPython 3.11) ran
 * more user-space instructions than the write to the client.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* relay/speedups.py's MARKERS, the byte strings every terminal event carries, each with
 * the index of the byte a search looks for first: one rare in JSON and in hex (audio). */
static const struct {
    const char *text;
    size_t anchor;
} MARKERS[] = {{"[DONE]", 0}, {"\"complete\"", 4}, {"\"error\"", 4}, {"base_resp", 4}};

/* Whether s[0:size] contains needle: memchr (vectorised) for its anchor byte, then a
 * compare. libc's memmem sets up tables on every call, which costs more on an event of a
 * hundred bytes than this search. */
static int
contains(const char *s, size_t size, const char *needle, size_t anchor)
{
    size_t length = strlen(needle);
    if (size < length)
        return 0;
    const char *p = s + anchor, *last = s + (size - length) + anchor;
    while (p <= last && (p = memchr(p, needle[anchor], (size_t)(last - p) + 1)) != NULL) {
        if (memcmp(p - anchor, needle, length) == 0)
            return 1;
        p++;
    }
    return 0;
}

/* plain_event(chunk) -> 1, 0 or -1: see relay/speedups.py. */
static PyObject *
plain_event(PyObject *module, PyObject *chunk)
{
    if (!PyBytes_Check(chunk)) {
        PyErr_SetString(PyExc_TypeError, "plain_event() takes bytes");
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(chunk);
    Py_ssize_t signed_end = PyBytes_GET_SIZE(chunk) - 2; /* where the one blank line is */
    if (signed_end < 0 || s[signed_end] != '\n' || s[signed_end + 1] != '\n')
        return PyLong_FromLong(-1);
    size_t end = (size_t)signed_end;
    if (memchr(s, '\r', end) != NULL) /* CR line ends: any CR may end a line */
        return PyLong_FromLong(-1);
    for (size_t i = 0; i < sizeof MARKERS / sizeof MARKERS[0]; i++) {
        if (contains(s, end, MARKERS[i].text, MARKERS[i].anchor))
            return PyLong_FromLong(-1);
    }
    /* Each line end before the blank one: another blank line (two events), or a data field. */
    int dispatches = end >= 4 && memcmp(s, "data", 4) == 0;
    for (const char *p = s; (p = memchr(p, '\n', end - (size_t)(p - s))) != NULL; p++) {
        size_t next = (size_t)(p - s) + 1;
        if (s[next] == '\n') /* next <= end: s[end] is the blank line's first LF */
            return PyLong_FromLong(-1);
        if (end - next >= 4 && memcmp(s + next, "data", 4) == 0)
            dispatches = 1;
    }
    return PyLong_FromLong(dispatches);
}

/* frame(chunk) -> the chunk in HTTP/1.1 chunked framing: size in hex, CRLF, chunk, CRLF. */
static PyObject *
frame(PyObject *module, PyObject *chunk)
{
    if (!PyBytes_Check(chunk)) {
        PyErr_SetString(PyExc_TypeError, "frame() takes bytes");
        return NULL;
    }
    size_t size = (size_t)PyBytes_GET_SIZE(chunk);
    char hex[2 * sizeof size];
    size_t digits = 0;
    for (size_t rest = size; digits == 0 || rest != 0; rest >>= 4)
        hex[sizeof hex - ++digits] = "0123456789abcdef"[rest & 15];
    PyObject *framed = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(digits + size + 4));
    if (framed == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(framed);
    memcpy(out, hex + sizeof hex - digits, digits);
    memcpy(out + digits, "\r\n", 2);
    memcpy(out + digits + 2, PyBytes_AS_STRING(chunk), size);
    memcpy(out + digits + 2 + size, "\r\n", 2);
    return framed;
}

static PyMethodDef methods[] = {
    {"plain_event", plain_event, METH_O, "1, 0 or -1: see relay.speedups.plain_event."},
    {"frame", frame, METH_O, "The chunk in HTTP/1.1 chunked framing."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._speedups",
    .m_doc = "The per-chunk path's byte scans in C (relay/speedups.py has them in Python).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module);
}
