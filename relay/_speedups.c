/* relay._speedups: the per-chunk path's two byte scans, its metrics' binning, the
 * switch that hands each body chunk to its sink, that sink, and the SSE tap's fast path,
 * in C.
 *
 * Each replaces a pure-Python function or class of relay/speedups.py, which documents
 * them, is used when this module was not built (no C compiler), and is the reference the
 * tests compare these with (tests/test_speedups.py). The two scans take one bytes object,
 * keep no state and touch no other object: the per-chunk path calls each once per chunk,
 * where the chain of ``bytes.partition`` calls they replace (about 1,000 instructions each
 * on CPython 3.11) ran more user-space instructions than the write to the client.
 * ChunkTimes bins a stream's chunk times in C doubles and counts, and holds no Python
 * object: its add() is the only per-chunk call the metrics make. Switch calls whatever
 * sink is attached to an upstream connection, in place of a Python method that would, and
 * Forward is the sink of a streaming response: it writes each chunk to the client, then
 * records it, with no Python frame; Events, the base of the SSE tap, counts the usual
 * chunk's event, and Forward calls it directly.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if PY_VERSION_HEX < 0x030C0000 /* the member types' names before 3.12 */
#include <structmember.h>
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_T_BOOL T_BOOL
#define Py_READONLY READONLY
#endif
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

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

/* How `chunk` settles as the usual SSE chunk: 1, 0 or -1, see relay/speedups.py's
 * plain_event_py. */
static int
plain_event_kind(PyObject *chunk)
{
    const char *s = PyBytes_AS_STRING(chunk);
    Py_ssize_t signed_end = PyBytes_GET_SIZE(chunk) - 2; /* where the one blank line is */
    if (signed_end < 0 || s[signed_end] != '\n' || s[signed_end + 1] != '\n')
        return -1;
    size_t end = (size_t)signed_end;
    if (memchr(s, '\r', end) != NULL) /* CR line ends: any CR may end a line */
        return -1;
    for (size_t i = 0; i < sizeof MARKERS / sizeof MARKERS[0]; i++) {
        if (contains(s, end, MARKERS[i].text, MARKERS[i].anchor))
            return -1;
    }
    /* Each line end before the blank one: another blank line (two events), or a data field. */
    int dispatches = end >= 4 && memcmp(s, "data", 4) == 0;
    for (const char *p = s; (p = memchr(p, '\n', end - (size_t)(p - s))) != NULL; p++) {
        size_t next = (size_t)(p - s) + 1;
        if (s[next] == '\n') /* next <= end: s[end] is the blank line's first LF */
            return -1;
        if (end - next >= 4 && memcmp(s + next, "data", 4) == 0)
            dispatches = 1;
    }
    return dispatches;
}

/* plain_event(chunk) -> 1, 0 or -1: see relay/speedups.py. */
static PyObject *
plain_event(PyObject *module, PyObject *chunk)
{
    if (!PyBytes_Check(chunk)) {
        PyErr_SetString(PyExc_TypeError, "plain_event() takes bytes");
        return NULL;
    }
    return PyLong_FromLong(plain_event_kind(chunk));
}

/* `prefix` (may be empty), then `chunk` in HTTP/1.1 chunked framing if `chunked` (its size
 * in hex, CRLF, the chunk, CRLF), else as it is: one new bytes object. */
static PyObject *
framed_after(const char *prefix, size_t prefix_size, PyObject *chunk, int chunked)
{
    size_t size = (size_t)PyBytes_GET_SIZE(chunk);
    char hex[2 * sizeof size];
    size_t digits = 0;
    if (chunked) {
        for (size_t rest = size; digits == 0 || rest != 0; rest >>= 4)
            hex[sizeof hex - ++digits] = "0123456789abcdef"[rest & 15];
    }
    size_t framing = chunked ? digits + 4 : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(prefix_size + framing + size));
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    memcpy(p, prefix, prefix_size);
    p += prefix_size;
    if (chunked) {
        memcpy(p, hex + sizeof hex - digits, digits);
        memcpy(p + digits, "\r\n", 2);
        p += digits + 2;
    }
    memcpy(p, PyBytes_AS_STRING(chunk), size);
    if (chunked)
        memcpy(p + size, "\r\n", 2);
    return out;
}

/* frame(chunk) -> the chunk in HTTP/1.1 chunked framing: size in hex, CRLF, chunk, CRLF. */
static PyObject *
frame(PyObject *module, PyObject *chunk)
{
    if (!PyBytes_Check(chunk)) {
        PyErr_SetString(PyExc_TypeError, "frame() takes bytes");
        return NULL;
    }
    return framed_after("", 0, chunk, 1);
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
 * caller which looked up its callback once (llhttp's body callback, in httptools; uvloop's
 * data_received) reaches whichever callable is attached now without a Python frame in
 * between. An ``on_error`` other than None is called with what the target raised (an
 * Exception, not a BaseException), and its result is the call's: the on_error of when the
 * call began. */
typedef struct {
    PyObject_HEAD
    PyObject *target;
    PyObject *on_error;
    vectorcallfunc vectorcall;
} Switch;

/* The raised exception, normalised with its traceback (PyErr_GetRaisedException on 3.12). */
static PyObject *
take_exception(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

static PyObject *
Switch_call(Switch *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->target == NULL) { /* cleared by the collector, as part of a dead cycle */
        PyErr_SetString(PyExc_RuntimeError, "a cleared Switch was called");
        return NULL;
    }
    /* The call may point the switch elsewhere (a sink that detaches, a body that ends):
     * what it raises goes to the on_error of when it began. Hold both. */
    PyObject *target = Py_NewRef(self->target);
    PyObject *on_error = Py_XNewRef(self->on_error);
    PyObject *result = PyObject_Vectorcall(target, args, nargsf, kwnames);
    Py_DECREF(target);
    if (result == NULL && on_error != NULL && on_error != Py_None &&
        PyErr_ExceptionMatches(PyExc_Exception)) {
        PyObject *exc = take_exception();
        if (exc != NULL) {
            result = PyObject_CallOneArg(on_error, exc);
            Py_DECREF(exc);
        }
    }
    Py_XDECREF(on_error);
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
    self->on_error = Py_NewRef(Py_None);
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

static PyObject *
Switch_get_on_error(Switch *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->on_error != NULL ? self->on_error : Py_None);
}

static int
Switch_set_on_error(Switch *self, PyObject *on_error, void *Py_UNUSED(closure))
{
    Py_XSETREF(self->on_error, Py_NewRef(on_error != NULL ? on_error : Py_None));
    return 0;
}

static int
Switch_traverse(Switch *self, visitproc visit, void *arg)
{
    Py_VISIT(self->target);
    Py_VISIT(self->on_error);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
Switch_clear(Switch *self)
{
    Py_CLEAR(self->target);
    Py_CLEAR(self->on_error);
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
    {"on_error", (getter)Switch_get_on_error, (setter)Switch_set_on_error,
     "Called with what the target raises, or None.", NULL},
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

/* The module's state: the names of the attributes and methods that Forward and Events
 * use, interned once, two constant byte strings and the Events type. */
typedef struct {
    PyObject *is_closing, *write, *writelines, *refuse, *pause, *writing_paused, *last,
        *bytes_out, *chunks, *gone_message, *general, *crlf, *empty, *events_type;
} State;

static struct PyModuleDef module;

/* The module's state, from a type of the module or a subclass of one (relay/sse.py's). */
static State *
state_of(PyTypeObject *type)
{
    PyObject *owner = PyType_GetModuleByDef(type, &module);
    return owner == NULL ? NULL : PyModule_GetState(owner);
}

/* Events: the fast path of the SSE tap (relay/sse.py's SseTap is its subclass); see
 * relay/speedups.py's EventsPy. */
typedef struct {
    PyObject_HEAD
    PyObject *pending; /* bytes: an unfinished event, kept by the subclass's general path */
    Py_ssize_t events;
    vectorcallfunc vectorcall;
} Events;

/* One chunk, after it was written: the usual one (a whole plain event, nothing pending)
 * settled here, any other by the subclass's _general(). */
static PyObject *
Events_tap(Events *self, State *st, PyObject *chunk)
{
    if (PyBytes_GET_SIZE(self->pending) == 0) {
        int kind = plain_event_kind(chunk);
        if (kind >= 0) {
            self->events += kind;
            Py_RETURN_NONE;
        }
    }
    return PyObject_CallMethodOneArg((PyObject *)self, st->general, chunk);
}

/* Forward: the sink of a streaming response; see relay/speedups.py's ForwardPy, which
 * documents it. */
typedef struct {
    PyObject_HEAD
    PyObject *transport, *protocol, *upstream, *exchange, *record, *watchdog, *tap, *gone;
    PyObject *head; /* bytes: the response head, until the first write takes it */
    int events;     /* the tap is an Events: settled without a call through Python */
    /* Where the protocol's writing_paused, the watchdog's last and the exchange's bytes_out
     * and chunks live in their objects, or -1: see slot_offset(). */
    Py_ssize_t at_paused, at_last, at_bytes_out, at_chunks;
    Py_ssize_t small; /* a chunked chunk under this many bytes is framed into one write */
    char chunked;     /* the response is chunked: frame each chunk */
    vectorcallfunc vectorcall;
} Forward;

/* time.monotonic(), as CPython computes it on Linux: CLOCK_MONOTONIC in nanoseconds, then
 * seconds as a double the way _PyTime_AsSecondsDouble makes them. */
static PyObject *
monotonic(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    int64_t ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    double seconds = ns % 1000000000 == 0 ? (double)(ns / 1000000000) : (double)ns / 1e9;
    return PyFloat_FromDouble(seconds);
}

/* Where the attribute `name` of `obj` is stored, when it is a plain ``__slots__`` member of
 * obj's class and the class gets and sets attributes the generic way: reading or writing
 * it is then the pointer access the generic protocol would end in, without the lookups on
 * the way (a third of the sink's instructions). -1 otherwise: the generic protocol. */
static Py_ssize_t
slot_offset(PyObject *obj, PyObject *name)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type->tp_getattro != PyObject_GenericGetAttr ||
        type->tp_setattro != PyObject_GenericSetAttr)
        return -1;
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name);
    if (descr == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
        PyObject_TypeCheck(obj, PyDescr_TYPE(descr))) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == Py_T_OBJECT_EX && !(member->flags & Py_READONLY))
            offset = member->offset;
    }
    Py_DECREF(descr);
    return offset;
}

/* obj.name (a new reference), from where slot_offset() found it. */
static PyObject *
get_field(PyObject *obj, Py_ssize_t offset, PyObject *name)
{
    if (offset < 0)
        return PyObject_GetAttr(obj, name);
    PyObject *value = *(PyObject **)((char *)obj + offset);
    if (value == NULL) { /* an empty slot, as the member descriptor reports it */
        PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%U'",
                     Py_TYPE(obj)->tp_name, name);
        return NULL;
    }
    return Py_NewRef(value);
}

/* obj.name = value, where slot_offset() found it. */
static int
set_field(PyObject *obj, Py_ssize_t offset, PyObject *name, PyObject *value)
{
    if (offset < 0)
        return PyObject_SetAttr(obj, name, value);
    Py_XSETREF(*(PyObject **)((char *)obj + offset), Py_NewRef(value));
    return 0;
}

/* The stream's counter `name` on the exchange, plus `by`. */
static int
add_to(PyObject *exchange, Py_ssize_t offset, PyObject *name, Py_ssize_t by)
{
    PyObject *value = get_field(exchange, offset, name);
    if (value == NULL)
        return -1;
    PyObject *increment = PyLong_FromSsize_t(by);
    PyObject *total = increment == NULL ? NULL : PyNumber_Add(value, increment);
    Py_DECREF(value);
    Py_XDECREF(increment);
    if (total == NULL)
        return -1;
    int set = set_field(exchange, offset, name, total);
    Py_DECREF(total);
    return set;
}

/* The chunk to the client: with the head before it the first time, framed when chunked;
 * a large chunk is written as three pieces rather than copied into one. */
static int
Forward_write(Forward *self, State *st, PyObject *chunk, Py_ssize_t size)
{
    PyObject *result;
    if (PyBytes_GET_SIZE(self->head) != 0) {
        PyObject *head = self->head;
        PyObject *data = framed_after(PyBytes_AS_STRING(head), (size_t)PyBytes_GET_SIZE(head),
                                      chunk, self->chunked && size != 0);
        if (data == NULL)
            return -1;
        self->head = Py_NewRef(st->empty);
        Py_DECREF(head);
        result = PyObject_CallMethodOneArg(self->transport, st->write, data);
        Py_DECREF(data);
    }
    else if (!self->chunked) {
        result = PyObject_CallMethodOneArg(self->transport, st->write, chunk);
    }
    else if (size < self->small) {
        PyObject *data = framed_after("", 0, chunk, 1);
        if (data == NULL)
            return -1;
        result = PyObject_CallMethodOneArg(self->transport, st->write, data);
        Py_DECREF(data);
    }
    else {
        char line[2 * sizeof(size_t) + 3];
        int length = snprintf(line, sizeof line, "%zx\r\n", (size_t)size);
        PyObject *pieces = Py_BuildValue("(y#OO)", line, (Py_ssize_t)length, chunk, st->crlf);
        if (pieces == NULL)
            return -1;
        result = PyObject_CallMethodOneArg(self->transport, st->writelines, pieces);
        Py_DECREF(pieces);
    }
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

static PyObject *
Forward_call(Forward *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "a Forward takes one chunk of bytes");
        return NULL;
    }
    if (self->transport == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a cleared Forward was called");
        return NULL;
    }
    State *st = PyType_GetModuleState(Py_TYPE(self));
    PyObject *chunk = args[0], *received = NULL, *written = NULL, *result;
    /* Everything it calls may drop the last other reference to it: hold it. */
    Py_INCREF(self);
    if ((received = monotonic()) == NULL)
        goto failed;
    result = PyObject_CallMethodNoArgs(self->transport, st->is_closing);
    int closing = result == NULL ? -1 : PyObject_IsTrue(result);
    Py_XDECREF(result);
    if (closing < 0)
        goto failed;
    if (closing) {
        PyObject *gone = PyObject_CallOneArg(self->gone, st->gone_message);
        if (gone == NULL)
            goto failed;
        PyObject *refuse_args[] = {self->upstream, chunk, gone};
        result = PyObject_VectorcallMethod(st->refuse, refuse_args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(gone);
        goto done;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(chunk);
    if (Forward_write(self, st, chunk, size) < 0 || (written = monotonic()) == NULL)
        goto failed;
    result = get_field(self->protocol, self->at_paused, st->writing_paused);
    int paused = result == NULL ? -1 : PyObject_IsTrue(result);
    Py_XDECREF(result);
    if (paused < 0)
        goto failed;
    if (paused) {
        result = PyObject_CallMethodNoArgs(self->upstream, st->pause);
        if (result == NULL)
            goto failed;
        Py_DECREF(result);
    }
    /* Idle time counts only while the relay waits on the upstream. */
    if (set_field(self->watchdog, self->at_last, st->last, written) < 0)
        goto failed;
    if (self->tap != Py_None) { /* after the write: a passive look never delays the client */
        result = self->events ? Events_tap((Events *)self->tap, st, chunk)
                              : PyObject_CallOneArg(self->tap, chunk);
        if (result == NULL)
            goto failed;
        Py_DECREF(result);
    }
    if (add_to(self->exchange, self->at_bytes_out, st->bytes_out, size) < 0 ||
        add_to(self->exchange, self->at_chunks, st->chunks, 1) < 0)
        goto failed;
    PyObject *times[] = {received, written};
    result = PyObject_Vectorcall(self->record, times, 2, NULL);
    goto done;
failed:
    result = NULL;
done:
    Py_XDECREF(received);
    Py_XDECREF(written);
    Py_DECREF(self);
    return result;
}

static PyObject *
Forward_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"transport", "protocol", "upstream", "exchange", "record",
                            "watchdog", "tap", "gone", "head", "chunked", "small", NULL};
    PyObject *transport, *protocol, *upstream, *exchange, *record, *watchdog, *tap, *gone;
    PyObject *head;
    int chunked;
    Py_ssize_t small;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOSpn:Forward", names, &transport,
                                     &protocol, &upstream, &exchange, &record, &watchdog, &tap,
                                     &gone, &head, &chunked, &small))
        return NULL;
    Forward *self = (Forward *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->transport = Py_NewRef(transport);
    self->protocol = Py_NewRef(protocol);
    self->upstream = Py_NewRef(upstream);
    self->exchange = Py_NewRef(exchange);
    self->record = Py_NewRef(record);
    self->watchdog = Py_NewRef(watchdog);
    self->tap = Py_NewRef(tap);
    State *st = PyType_GetModuleState(type);
    self->at_paused = slot_offset(protocol, st->writing_paused);
    self->at_last = slot_offset(watchdog, st->last);
    self->at_bytes_out = slot_offset(exchange, st->bytes_out);
    self->at_chunks = slot_offset(exchange, st->chunks);
    /* An Events whose class keeps its call (SseTap does) is settled in C; a subclass that
     * overrides __call__ is called as any tap is. */
    PyTypeObject *events = (PyTypeObject *)st->events_type;
    self->events = PyObject_TypeCheck(tap, events) && Py_TYPE(tap)->tp_call == events->tp_call;
    self->gone = Py_NewRef(gone);
    self->head = Py_NewRef(head);
    self->chunked = (char)chunked;
    self->small = small;
    self->vectorcall = (vectorcallfunc)Forward_call;
    return (PyObject *)self;
}

static PyObject *
Forward_get_head(Forward *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->head != NULL ? self->head : Py_None);
}

static int
Forward_set_head(Forward *self, PyObject *head, void *Py_UNUSED(closure))
{
    if (head == NULL || !PyBytes_Check(head)) {
        PyErr_SetString(PyExc_TypeError, "a Forward's head is bytes");
        return -1;
    }
    Py_XSETREF(self->head, Py_NewRef(head));
    return 0;
}

static int
Forward_traverse(Forward *self, visitproc visit, void *arg)
{
    Py_VISIT(self->transport);
    Py_VISIT(self->protocol);
    Py_VISIT(self->upstream);
    Py_VISIT(self->exchange);
    Py_VISIT(self->record);
    Py_VISIT(self->watchdog);
    Py_VISIT(self->tap);
    Py_VISIT(self->gone);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int
Forward_clear(Forward *self)
{
    Py_CLEAR(self->transport);
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->upstream);
    Py_CLEAR(self->exchange);
    Py_CLEAR(self->record);
    Py_CLEAR(self->watchdog);
    Py_CLEAR(self->tap);
    Py_CLEAR(self->gone);
    Py_CLEAR(self->head);
    return 0;
}

static void
Forward_dealloc(Forward *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Forward_clear(self);
    type->tp_free(self);
    Py_DECREF(type);
}

static PyGetSetDef Forward_getset[] = {
    {"head", (getter)Forward_get_head, (setter)Forward_set_head,
     "The response head, written with the first chunk (b\"\" once written).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Forward_members[] = {
    {"transport", Py_T_OBJECT_EX, offsetof(Forward, transport), Py_READONLY, NULL},
    {"protocol", Py_T_OBJECT_EX, offsetof(Forward, protocol), Py_READONLY, NULL},
    {"upstream", Py_T_OBJECT_EX, offsetof(Forward, upstream), Py_READONLY, NULL},
    {"chunked", Py_T_BOOL, offsetof(Forward, chunked), Py_READONLY, NULL},
    {"small", Py_T_PYSSIZET, offsetof(Forward, small), Py_READONLY, NULL},
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(Forward, vectorcall), Py_READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Forward_slots[] = {
    {Py_tp_new, Forward_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_dealloc, Forward_dealloc},
    {Py_tp_traverse, Forward_traverse},
    {Py_tp_clear, Forward_clear},
    {Py_tp_getset, Forward_getset},
    {Py_tp_members, Forward_members},
    {Py_tp_doc, "Writes each chunk to the client: see relay.speedups.ForwardPy."},
    {0, NULL},
};

static PyType_Spec Forward_spec = {
    .name = "relay._speedups.Forward",
    .basicsize = sizeof(Forward),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = Forward_slots,
};

static PyObject *
Events_call(Events *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "an event tap takes one chunk of bytes");
        return NULL;
    }
    State *st = state_of(Py_TYPE(self));
    return st == NULL ? NULL : Events_tap(self, st, args[0]);
}

static PyObject *
Events_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    State *st = state_of(type);
    if (st == NULL)
        return NULL;
    Events *self = (Events *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->pending = Py_NewRef(st->empty);
    self->vectorcall = (vectorcallfunc)Events_call;
    return (PyObject *)self;
}

static void
Events_dealloc(Events *self)
{
    PyTypeObject *type = Py_TYPE(self);
    Py_CLEAR(self->pending);
    type->tp_free(self);
    Py_DECREF(type);
}

static PyObject *
Events_get_pending(Events *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->pending);
}

static int
Events_set_pending(Events *self, PyObject *pending, void *Py_UNUSED(closure))
{
    if (pending == NULL || !PyBytes_CheckExact(pending)) {
        PyErr_SetString(PyExc_TypeError, "an event tap's pending part is bytes");
        return -1;
    }
    Py_SETREF(self->pending, Py_NewRef(pending));
    return 0;
}

static PyGetSetDef Events_getset[] = {
    {"_pending", (getter)Events_get_pending, (setter)Events_set_pending,
     "An unfinished event (b\"\" at an event boundary).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Events_members[] = {
    {"events", Py_T_PYSSIZET, offsetof(Events, events), 0, "Events dispatched so far."},
    {"__vectorcalloffset__", Py_T_PYSSIZET, offsetof(Events, vectorcall), Py_READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Events_slots[] = {
    {Py_tp_new, Events_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_dealloc, Events_dealloc},
    {Py_tp_getset, Events_getset},
    {Py_tp_members, Events_members},
    {Py_tp_doc, "The SSE tap's fast path: see relay.speedups.EventsPy."},
    {0, NULL},
};

static PyType_Spec Events_spec = {
    .name = "relay._speedups.Events",
    .basicsize = sizeof(Events),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = Events_slots,
};

static int
State_traverse(PyObject *module, visitproc visit, void *arg)
{
    State *st = PyModule_GetState(module);
    if (st == NULL)
        return 0;
    PyObject **names = (PyObject **)st;
    for (size_t i = 0; i < sizeof(State) / sizeof(PyObject *); i++)
        Py_VISIT(names[i]);
    return 0;
}

static int
State_clear(PyObject *module)
{
    State *st = PyModule_GetState(module);
    if (st == NULL)
        return 0;
    PyObject **names = (PyObject **)st;
    for (size_t i = 0; i < sizeof(State) / sizeof(PyObject *); i++)
        Py_CLEAR(names[i]);
    return 0;
}

static void
State_free(void *module)
{
    State_clear((PyObject *)module);
}

static int
State_init(PyObject *module)
{
    State *st = PyModule_GetState(module);
    static const char *const names[] = {
        "is_closing", "write", "writelines", "refuse", "pause", "writing_paused", "last",
        "bytes_out", "chunks", "the client went away", "_general"};
    PyObject **slots = (PyObject **)st;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if ((slots[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return -1;
    }
    if ((st->crlf = PyBytes_FromStringAndSize("\r\n", 2)) == NULL)
        return -1;
    return (st->empty = PyBytes_FromStringAndSize("", 0)) == NULL ? -1 : 0;
}

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
    if (State_init(module) < 0 || add_type(module, &ChunkTimes_spec, "ChunkTimes") < 0 ||
        add_type(module, &Switch_spec, "Switch") < 0 || add_type(module, &Forward_spec, "Forward") < 0)
        return -1;
    State *st = PyModule_GetState(module);
    st->events_type = PyType_FromModuleAndSpec(module, &Events_spec, NULL);
    if (st->events_type == NULL)
        return -1;
    return PyModule_AddObjectRef(module, "Events", st->events_type);
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
    .m_size = sizeof(State),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = State_traverse,
    .m_clear = State_clear,
    .m_free = State_free,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module);
}
