/* relay._speedups: the per-chunk path's two byte scans, its metrics' binning and the
 * switch that hands each body chunk to its sink, in C.
 *
 * Each replaces a pure-Python function or class of relay/speedups.py, which documents
 * them, is used when this module was not built (no C compiler), and is the reference the
 * tests compare these with (tests/test_speedups.py). The two scans take one bytes object,
 * keep no state and touch no other object: the per-chunk path calls each once per chunk,
 * where the chain of ``bytes.partition`` calls they replace (about 1,000 instructions each
 * on CPython 3.11) ran more user-space instructions than the write to the client.
 * ChunkTimes bins a stream's chunk times in C doubles and counts, and holds no Python
 * object: its add() is the only per-chunk call the metrics make. Switch calls whatever
 * sink is attached to an upstream connection, in place of a Python method that would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if PY_VERSION_HEX < 0x030C0000 /* the member types' names before 3.12 */
#include <structmember.h>
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_READONLY READONLY
#endif
#include <math.h>
#include <stddef.h>
#include <stdint.h>
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

/* ChunkTimes: one stream's chunk times, binned; see relay/speedups.py's ChunkTimesPy. */

/* Every open stream has one, so it stays small (about 550 bytes): room for 20 bounds, and
 * counts of 32 bits, which hold a second's chunks (take() empties them each flush). */
#define MAX_BOUNDS 20

typedef struct {
    PyObject_HEAD
    Py_ssize_t gap_n, forward_n;
    double gap_bounds[MAX_BOUNDS], forward_bounds[MAX_BOUNDS];
    uint32_t gap_counts[MAX_BOUNDS], forward_counts[MAX_BOUNDS];
    double gap_sum, forward_sum, previous, first_written;
    int started;
} ChunkTimes;

/* Histogram bucket upper bounds, ascending and ending with +inf, into `out`. */
static int
read_bounds(PyObject *bounds, double *out, Py_ssize_t *count)
{
    PyObject *items = PySequence_Fast(bounds, "bounds must be a sequence of floats");
    if (items == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n && i < MAX_BOUNDS; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(items, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(items);
            return -1;
        }
    }
    Py_DECREF(items);
    if (n < 1 || n > MAX_BOUNDS || out[n - 1] != INFINITY) {
        PyErr_Format(PyExc_ValueError, "1 to %d bounds, the last one inf", MAX_BOUNDS);
        return -1;
    }
    *count = n;
    return 0;
}

/* bisect.bisect_left(bounds, x): the bucket Histogram.observe(x) counts x in. */
static Py_ssize_t
bucket(const double *bounds, Py_ssize_t n, double x)
{
    Py_ssize_t low = 0, high = n;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (bounds[middle] < x)
            low = middle + 1;
        else
            high = middle;
    }
    return low < n ? low : n - 1; /* n only for a NaN past +inf: never from a clock */
}

static PyObject *
ChunkTimes_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *gap_bounds, *forward_bounds;
    if (!PyArg_ParseTuple(args, "OO:ChunkTimes", &gap_bounds, &forward_bounds))
        return NULL;
    ChunkTimes *self = (ChunkTimes *)type->tp_alloc(type, 0); /* zeroed */
    if (self == NULL)
        return NULL;
    if (read_bounds(gap_bounds, self->gap_bounds, &self->gap_n) < 0 ||
        read_bounds(forward_bounds, self->forward_bounds, &self->forward_n) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
ChunkTimes_dealloc(ChunkTimes *self)
{
    PyTypeObject *type = Py_TYPE(self);
    type->tp_free(self);
    Py_DECREF(type);
}

/* add(received, written): one chunk, read at `received` and written at `written`. */
static PyObject *
ChunkTimes_add(ChunkTimes *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add() takes received and written");
        return NULL;
    }
    double received = PyFloat_AsDouble(args[0]);
    if (received == -1.0 && PyErr_Occurred())
        return NULL;
    double written = PyFloat_AsDouble(args[1]);
    if (written == -1.0 && PyErr_Occurred())
        return NULL;
    if (!self->started) {
        self->started = 1;
        self->first_written = written;
    }
    else {
        double gap = received - self->previous;
        self->gap_counts[bucket(self->gap_bounds, self->gap_n, gap)]++;
        self->gap_sum += gap;
    }
    self->previous = received;
    double forward = written - received;
    self->forward_counts[bucket(self->forward_bounds, self->forward_n, forward)]++;
    self->forward_sum += forward;
    Py_RETURN_NONE;
}

static PyObject *
counts_list(const uint32_t *counts, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list != NULL && i < n; i++) {
        PyObject *count = PyLong_FromUnsignedLong(counts[i]);
        if (count == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, count);
    }
    return list;
}

/* take() -> (gap counts, gap sum, forward counts, forward sum) since the last take. */
static PyObject *
ChunkTimes_take(ChunkTimes *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *gaps = counts_list(self->gap_counts, self->gap_n);
    PyObject *forwards = counts_list(self->forward_counts, self->forward_n);
    PyObject *taken = NULL;
    if (gaps != NULL && forwards != NULL)
        taken = Py_BuildValue("(OdOd)", gaps, self->gap_sum, forwards, self->forward_sum);
    Py_XDECREF(gaps);
    Py_XDECREF(forwards);
    if (taken != NULL) {
        memset(self->gap_counts, 0, sizeof self->gap_counts);
        memset(self->forward_counts, 0, sizeof self->forward_counts);
        self->gap_sum = self->forward_sum = 0.0;
    }
    return taken;
}

static PyObject *
ChunkTimes_first_written(ChunkTimes *self, void *Py_UNUSED(closure))
{
    if (!self->started)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(self->first_written);
}

static PyMethodDef ChunkTimes_methods[] = {
    {"add", (PyCFunction)(void (*)(void))ChunkTimes_add, METH_FASTCALL, "One chunk's times."},
    {"take", (PyCFunction)ChunkTimes_take, METH_NOARGS, "The bins since the last take."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ChunkTimes_getset[] = {
    {"first_written", (getter)ChunkTimes_first_written, NULL, "The first chunk's write time.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot ChunkTimes_slots[] = {
    {Py_tp_new, ChunkTimes_new},
    {Py_tp_dealloc, ChunkTimes_dealloc},
    {Py_tp_methods, ChunkTimes_methods},
    {Py_tp_getset, ChunkTimes_getset},
    {Py_tp_doc, "One stream's chunk times, binned: see relay.speedups.ChunkTimes."},
    {0, NULL},
};

static PyType_Spec ChunkTimes_spec = {
    .name = "relay._speedups.ChunkTimes",
    .basicsize = sizeof(ChunkTimes),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = ChunkTimes_slots,
};

/* Switch: a callable that passes its arguments on to its current ``target``, so that a
 * caller which looked up its callback once (llhttp's body callback, in httptools) reaches
 * whichever sink is attached now without a Python frame in between. */
typedef struct {
    PyObject_HEAD
    PyObject *target;
    vectorcallfunc vectorcall;
} Switch;

static PyObject *
Switch_call(Switch *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->target == NULL) { /* cleared by the collector, as part of a dead cycle */
        PyErr_SetString(PyExc_RuntimeError, "a cleared Switch was called");
        return NULL;
    }
    /* The target may replace itself during the call (a sink that detaches): hold it. */
    PyObject *target = Py_NewRef(self->target);
    PyObject *result = PyObject_Vectorcall(target, args, nargsf, kwnames);
    Py_DECREF(target);
    return result;
}

static PyObject *
Switch_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if ((kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) || PyTuple_GET_SIZE(args) != 1) {
        PyErr_SetString(PyExc_TypeError, "Switch() takes one target");
        return NULL;
    }
    PyObject *target = PyTuple_GET_ITEM(args, 0);
    Switch *self = (Switch *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->target = Py_NewRef(target);
    self->vectorcall = (vectorcallfunc)Switch_call;
    return (PyObject *)self;
}

static int
Switch_set_target(Switch *self, PyObject *target, void *Py_UNUSED(closure))
{
    if (target == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a Switch always has a target");
        return -1;
    }
    Py_SETREF(self->target, Py_NewRef(target));
    return 0;
}

static PyObject *
Switch_get_target(Switch *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->target != NULL ? self->target : Py_None);
}

static int
Switch_traverse(Switch *self, visitproc visit, void *arg)
{
    Py_VISIT(self->target);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
Switch_clear(Switch *self)
{
    Py_CLEAR(self->target);
    return 0;
}

static void
Switch_dealloc(Switch *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Switch_clear(self);
    type->tp_free(self);
    Py_DECREF(type);
}

static PyGetSetDef Switch_getset[] = {
    {"target", (getter)Switch_get_target, (setter)Switch_set_target, "What a call reaches.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Switch_members[] = {
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(Switch, vectorcall), Py_READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Switch_slots[] = {
    {Py_tp_new, Switch_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_dealloc, Switch_dealloc},
    {Py_tp_traverse, Switch_traverse},
    {Py_tp_clear, Switch_clear},
    {Py_tp_getset, Switch_getset},
    {Py_tp_members, Switch_members},
    {Py_tp_doc, "Calls its target with its arguments: see relay.speedups.SwitchPy."},
    {0, NULL},
};

static PyType_Spec Switch_spec = {
    .name = "relay._speedups.Switch",
    .basicsize = sizeof(Switch),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = Switch_slots,
};

static int
add_type(PyObject *module, PyType_Spec *spec, const char *name)
{
    PyObject *type = PyType_FromModuleAndSpec(module, spec, NULL);
    if (type == NULL)
        return -1;
    int added = PyModule_AddObjectRef(module, name, type);
    Py_DECREF(type);
    return added;
}

static int
exec_module(PyObject *module)
{
    if (add_type(module, &ChunkTimes_spec, "ChunkTimes") < 0)
        return -1;
    return add_type(module, &Switch_spec, "Switch");
}

static PyMethodDef methods[] = {
    {"plain_event", plain_event, METH_O, "1, 0 or -1: see relay.speedups.plain_event."},
    {"frame", frame, METH_O, "The chunk in HTTP/1.1 chunked framing."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._speedups",
    .m_doc = "The per-chunk path in C (relay/speedups.py has it in Python too).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module);
}
