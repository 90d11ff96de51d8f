/* offlog._speedups: Producer.write and Consumer.drain of offlog/shm/ring.py in C, over _ring_core.h.
 *
 * Theory of operation
 * -------------------
 * The pure-Python ``Producer.write`` is the reference and the fallback; this is
 * the same hot path at the cost of one C call. ``producer_write(Producer)``
 * makes a method descriptor that offlog/shm/ring.py puts in the class in place
 * of the Python ``write``, so ``producer.write`` is a bound built-in method
 * (a transport and a ProxyFile keep it and call it directly) and the producer
 * holds no reference to it (no cycle: a dropped producer and its mapping go at
 * once, and the hang-up watcher's weak reference dies with it).
 *
 * The producer's state stays in its Python attributes. Those of the hot path
 * (``_token``, ``_head``, ``_limit``, ``_data``, ``_words``) are slots
 * (``Producer.__slots__``): this module reads and writes them at the offsets
 * their member descriptors give, so the slow path, ``interrupt()`` from
 * another thread, ``detach()`` after a fork and a replaced token are seen as
 * the Python hot path sees them, at the cost of a load each. A call does what
 * the Python one does, in the same order:
 *
 * 1. the write token free? (``_token`` not empty); taken: ``_write_slow``.
 * 2. the source: exactly ``bytes``, ``bytearray``, or a 1-D memoryview of
 *    format "B" (what the Python slice assignment takes; one that is not
 *    contiguous is gathered first). Anything else (``str``, other buffers)
 *    goes to ``_write_slow``, which writes the same bytes.
 * 3. ``head = _head``; ``head + n <= _limit`` (``_limit`` folds the room before
 *    the cached tail, the end of the lap and "take the slow path", -1), else
 *    ``_write_slow``. ``offlog_ring_put`` copies, stores HEAD (release) and
 *    loads STATE (acquire); then ``_head = head + n``.
 * 4. STATE SLEEPING or FAILED: ``_wake_or_fail()`` (posts the doorbell, or calls
 *    ``on_failed``, which may raise), with the token held, as the Python write.
 * 5. an exception with the token held: ``_resync()``, then it propagates.
 *
 * Token and signals. Steps 1 to 3 run no Python code: no call made there runs
 * any, releases the GIL or runs a signal handler (CPython's C handler only
 * flags the signal; its Python handler runs after this call returns). So no
 * thread and no handler can look at the token between them, and the GIL is
 * the token there: a write that finds ``_token`` not empty owns the producer
 * until it runs Python code, exactly as if it had popped the token. Steps 4
 * and 5 run Python code, so they take the token for real (``_token.pop()``,
 * then ``append(True)``), and both methods are in ``Producer.HOLDING``, where
 * offlog.token looks for the holder's frames (this call has none): a signal
 * handler that writes in there sets its record aside, another thread waits,
 * and nobody takes the token for leaked. A KeyboardInterrupt lands after the
 * call, never between the copy and the publish.
 *
 * Consumer.drain(fd), the server's hot path, the same way: ``consumer_drain(Consumer,
 * RingCorrupt)`` makes its method descriptor over ``Consumer.__slots__``
 * (``_words``, ``_data``, ``_capacity``, ``_tail``). A call does what the
 * Python ``drain`` does, in the same order:
 *
 * 1. HEAD, loaded with acquire and checked as ``Consumer.available`` checks it
 *    (``offlog_ring_available``); a bad one raises RingCorrupt with the same
 *    text, having written nothing.
 * 2. ``[_tail, HEAD)`` as one or two iovecs, written with ``writev`` with the
 *    GIL released (the buffers of both views held meanwhile, so nobody can
 *    release the mapping under it), a partial write finished in order, EINTR
 *    retried after the signal check (as ``os.writev``). An error raises
 *    OSError with its errno (``PyErr_SetFromErrno``, as ``os.writev``) and
 *    ``characters_written`` set to the bytes of this drain already in the
 *    file, for the caller to cut off (``OpenFile.append_ring``); TAIL and
 *    ``_tail`` are left as they were.
 * 3. TAIL, stored with release (``offlog_ring_release``), and ``_tail``.
 *
 * ``fence()`` is the acquire-release fence that the Python paths of
 * offlog/shm/ring.py put between their plain header loads and stores where a
 * weakly ordered machine needs one (a compiler barrier alone on x86-64).
 *
 * Memory ordering: _ring_core.h (release store of HEAD after the copy, acquire
 * load of STATE; acquire load of HEAD before the bytes are read, release store
 * of TAIL after they are written; the consumer's SETTLE re-read closes the
 * store->load window).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef Py_T_OBJECT_EX /* before Python 3.12 */
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif

#include <errno.h>

#include "_ring_core.h"

static PyObject *str_write_slow, *str_wake_or_fail, *str_resync, *str_characters_written;
static PyObject *ring_corrupt; /* offlog.shm.ring.RingCorrupt, given to consumer_drain() */
static PyObject *deque_pop, *deque_append; /* collections.deque's methods: the token's two C calls */

/* A class's hot-path attributes (its ``__slots__``): their names and offsets in an instance. */
#define MOST_SLOTS 5
struct slots {
    const char *maker; /* the function that makes the method, for its errors */
    int count;
    const char *names[MOST_SLOTS];
    Py_ssize_t offsets[MOST_SLOTS];
};

enum { TOKEN, HEAD, LIMIT, DATA, WORDS };
static struct slots producer_slots = {"producer_write()", 5, {"_token", "_head", "_limit", "_data", "_words"}, {0}};
enum { CONSUMER_WORDS, CONSUMER_DATA, CONSUMER_CAPACITY, CONSUMER_TAIL };
static struct slots consumer_slots = {"consumer_drain()", 4, {"_words", "_data", "_capacity", "_tail"}, {0}};

static PyObject **slot(PyObject *self, const struct slots *slots, int which)
{
    return (PyObject **)((char *)self + slots->offsets[which]);
}

/* A slot's value (borrowed), or NULL with the AttributeError of an unset one. */
static PyObject *slot_value(PyObject *self, const struct slots *slots, int which)
{
    PyObject *value = *slot(self, slots, which);
    if (value == NULL)
        PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%s'", Py_TYPE(self)->tp_name,
                     slots->names[which]);
    return value;
}

static PyObject *take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

static void raise_exception(PyObject *exception)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exception);
#else
    PyObject *type = (PyObject *)Py_TYPE(exception);
    Py_INCREF(type);
    PyErr_Restore(type, exception, PyException_GetTraceback(exception));
#endif
}

/* The exception just raised, raised while handling ``earlier`` (its __context__). */
static PyObject *raised_during(PyObject *earlier)
{
    PyObject *later = take_exception();
    if (earlier != NULL)
        PyException_SetContext(later, earlier);
    return later;
}

/* A write's bytes, as the hot path takes them: ``buf``, ``len``; ``view.obj`` set for a
 * memoryview (released by source_close), ``copy`` for one that is not contiguous. */
struct source {
    const char *buf;
    Py_ssize_t len;
    Py_buffer view;
    char *copy;
};

static int is_unsigned_bytes(const Py_buffer *view)
{
    const char *format = view->format;
    if (format != NULL && format[0] == '@')
        format++;
    return view->ndim == 1 && view->itemsize == 1 && format != NULL && strcmp(format, "B") == 0;
}

/* What the Python hot path's slice assignment takes: bytes, bytearray, or a 1-D memoryview of
 * format "B", contiguous or not. 1: taken; 0: the slow path's; -1: an exception (its len()). */
static int source_open(PyObject *data, struct source *source)
{
    source->view.obj = NULL;
    source->copy = NULL;
    if (PyBytes_CheckExact(data)) {
        source->buf = PyBytes_AS_STRING(data);
        source->len = PyBytes_GET_SIZE(data);
        return 1;
    }
    if (PyByteArray_CheckExact(data)) {
        source->buf = PyByteArray_AS_STRING(data);
        source->len = PyByteArray_GET_SIZE(data);
        return 1;
    }
    if (!PyMemoryView_Check(data))
        return 0;
    if (PyObject_Size(data) < 0) /* the Python hot path's len(data): a released or 0-D view raises */
        return -1;
    if (PyObject_GetBuffer(data, &source->view, PyBUF_FULL_RO) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (!is_unsigned_bytes(&source->view)) {
        PyBuffer_Release(&source->view);
        return 0;
    }
    source->len = source->view.len;
    if (PyBuffer_IsContiguous(&source->view, 'C')) {
        source->buf = source->view.buf;
        return 1;
    }
    source->copy = PyMem_Malloc(source->len ? (size_t)source->len : 1);
    if (source->copy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyBuffer_ToContiguous(source->copy, &source->view, source->len, 'C') < 0)
        return -1;
    source->buf = source->copy;
    return 1;
}

static void source_close(struct source *source)
{
    PyMem_Free(source->copy);
    if (source->view.obj != NULL)
        PyBuffer_Release(&source->view);
}

/* The buffer of a live, writable memoryview (``_data``, ``_words``), else NULL: detached after a
 * fork (None), released, or read-only, where the Python slice assignment fails too. */
static Py_buffer *writable_view(PyObject *view)
{
    if (view == NULL || !PyMemoryView_Check(view) || ((PyMemoryViewObject *)view)->flags & _Py_MEMORYVIEW_RELEASED)
        return NULL;
    Py_buffer *buffer = PyMemoryView_GET_BUFFER(view);
    return buffer->readonly ? NULL : buffer;
}

/* Steps 2 and 3, running no Python code. 1: published, ``*outcome`` says what STATE asks for;
 * 0: the slow path's, nothing written; -1: an exception. */
static int put(PyObject *self, PyObject *data, enum offlog_put *outcome)
{
    struct source source;
    PyObject *head_obj, *limit_obj, *end;
    Py_buffer *area, *header;
    unsigned long long head;
    long long limit;
    int result = source_open(data, &source);
    if (result <= 0)
        goto done;
    result = -1;
    if ((head_obj = slot_value(self, &producer_slots, HEAD)) == NULL
        || (limit_obj = slot_value(self, &producer_slots, LIMIT)) == NULL)
        goto done;
    if ((head = PyLong_AsUnsignedLongLong(head_obj)) == (unsigned long long)-1 && PyErr_Occurred())
        goto done;
    if ((limit = PyLong_AsLongLong(limit_obj)) == -1 && PyErr_Occurred())
        goto done;
    result = 0;
    if (limit < 0 || (uint64_t)limit < head || (uint64_t)source.len > (uint64_t)limit - head)
        goto done; /* end > _limit */
    area = writable_view(*slot(self, &producer_slots, DATA));
    header = writable_view(*slot(self, &producer_slots, WORDS));
    if (area == NULL || header == NULL || area->len <= 0 || (area->len & (area->len - 1))
        || header->len < (Py_ssize_t)sizeof(struct offlog_ring_header) || (uintptr_t)header->buf % 8)
        goto done;
    if ((end = PyLong_FromUnsignedLongLong(head + (uint64_t)source.len)) == NULL) {
        result = -1;
        goto done;
    }
    *outcome = offlog_ring_put(header->buf, area->buf, (uint64_t)area->len, head, (uint64_t)limit, source.buf,
                               (size_t)source.len);
    if (*outcome == OFFLOG_PUT_NO_ROOM) {
        Py_DECREF(end);
        goto done;
    }
    Py_SETREF(*slot(self, &producer_slots, HEAD), end);
    result = 1;
done:
    source_close(&source);
    return result;
}

/* ``token.append(True)``: 0, or -1 with an exception set. */
static int give_back(PyObject *token)
{
    PyObject *args[2] = {token, Py_True};
    PyObject *none = PyObject_Vectorcall(deque_append, args, 2, NULL);
    Py_XDECREF(none);
    return none == NULL ? -1 : 0;
}

/* Steps 4 and 5, Python code with the token held: ``_wake_or_fail()`` after a publish, or
 * ``_resync()`` for the exception set (``published`` 0), as the Python write's ``except
 * BaseException: self._resync(); raise`` and ``finally: tok.append(True)``. */
static PyObject *finish_holding(PyObject *self, PyObject *token, int published)
{
    PyObject *exception = published ? NULL : take_exception();
    PyObject *done = PyObject_Vectorcall(deque_pop, &token, 1, NULL); /* free: nothing ran since step 1 */
    if (done == NULL) {
        raise_exception(raised_during(exception));
        return NULL;
    }
    Py_DECREF(done);
    if (published) {
        done = PyObject_CallMethodNoArgs(self, str_wake_or_fail);
        if (done == NULL)
            exception = take_exception();
    }
    if (exception != NULL) {
        done = PyObject_CallMethodNoArgs(self, str_resync);
        if (done == NULL)
            exception = raised_during(exception);
    }
    Py_XDECREF(done);
    if (give_back(token) < 0)
        exception = raised_during(exception);
    if (exception != NULL) {
        raise_exception(exception);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *ring_write(PyObject *self, PyObject *data)
{
    PyObject *token = slot_value(self, &producer_slots, TOKEN);
    if (token == NULL)
        return NULL;
    Py_ssize_t token_free = PyObject_Size(token);
    if (token_free < 0)
        return NULL;
    enum offlog_put outcome = OFFLOG_PUT_DONE;
    int done = token_free ? put(self, data, &outcome) : 0;
    if (done == 0)
        return PyObject_CallMethodOneArg(self, str_write_slow, data);
    if (done > 0 && outcome == OFFLOG_PUT_DONE)
        Py_RETURN_NONE;
    Py_INCREF(token); /* the Python code may replace ``_token``: the one taken goes back */
    PyObject *result = finish_holding(self, token, done > 0);
    Py_DECREF(token);
    return result;
}

static PyMethodDef write_def = {
    "write",
    (PyCFunction)ring_write,
    METH_O,
    "write(data): the ring's hot path in C (offlog/_speedups.c); offlog.shm.ring.python_write is the reference.",
};

/* The offsets of ``cls``'s hot-path slots, which must be object slots (``__slots__``). */
static int find_slots(PyObject *cls, struct slots *slots)
{
    Py_ssize_t offsets[MOST_SLOTS] = {0};
    if (!PyType_Check(cls)) {
        PyErr_Format(PyExc_TypeError, "%s takes a class", slots->maker);
        return -1;
    }
    for (int which = 0; which < slots->count; which++) {
        PyObject *member = PyObject_GetAttrString(cls, slots->names[which]);
        if (member == NULL)
            return -1;
        int usable = Py_IS_TYPE(member, &PyMemberDescr_Type)
                     && ((PyMemberDescrObject *)member)->d_member->type == Py_T_OBJECT_EX;
        offsets[which] = usable ? ((PyMemberDescrObject *)member)->d_member->offset : 0;
        Py_DECREF(member);
        if (!usable) {
            PyErr_Format(PyExc_TypeError, "%s must be in %.100s.__slots__", slots->names[which],
                         ((PyTypeObject *)cls)->tp_name);
            return -1;
        }
        if (slots->offsets[which] && slots->offsets[which] != offsets[which]) {
            PyErr_Format(PyExc_TypeError, "%s serves one class", slots->maker);
            return -1;
        }
    }
    memcpy(slots->offsets, offsets, sizeof(offsets));
    return 0;
}

static PyObject *producer_write(PyObject *module, PyObject *cls)
{
    if (find_slots(cls, &producer_slots) < 0)
        return NULL;
    return PyDescr_NewMethod((PyTypeObject *)cls, &write_def);
}

/* -- Consumer.drain ---------------------------------------------------------------------------- */

/* Write the ``count`` iovecs at ``span`` whole to ``fd`` (advancing them), the GIL released
 * around each ``writev``; ``*written`` counts the bytes written. 0; -1 with ``errno`` set
 * (no exception yet); -2 with the exception of a signal handler (EINTR, as os.writev). */
static int write_whole(int fd, struct iovec *span, int count, uint64_t *written)
{
    while (count > 0) {
        ssize_t n;
        int error;
        Py_BEGIN_ALLOW_THREADS
        n = writev(fd, span, count);
        error = errno;
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (error != EINTR) {
                errno = error;
                return -1;
            }
            if (PyErr_CheckSignals() < 0)
                return -2;
            continue;
        }
        *written += (uint64_t)n;
        for (; count > 0 && (size_t)n >= span->iov_len; span++, count--)
            n -= (ssize_t)span->iov_len;
        if (count > 0) {
            span->iov_base = (char *)span->iov_base + n;
            span->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* Raise OSError for ``errno`` (the subclass os.writev raises) with ``characters_written``. */
static void raise_write_error(uint64_t written)
{
    PyErr_SetFromErrno(PyExc_OSError);
    PyObject *exception = take_exception();
    PyObject *count = PyLong_FromUnsignedLongLong(written);
    if (count == NULL || PyObject_SetAttr(exception, str_characters_written, count) < 0)
        exception = raised_during(exception);
    Py_XDECREF(count);
    raise_exception(exception);
}

/* Raise RingCorrupt for what offlog_ring_available found, in Consumer.available's words. */
static void raise_corrupt(enum offlog_available found, uint64_t head, uint64_t tail, uint64_t capacity)
{
    if (found == OFFLOG_BAD_HEAD)
        PyErr_Format(ring_corrupt, "producer position %llu outside [%llu, %llu]", (unsigned long long)head,
                     (unsigned long long)tail, (unsigned long long)(tail + capacity));
    else if (found == OFFLOG_BAD_MAGIC)
        PyErr_SetString(ring_corrupt, "ring header identity (magic or capacity) was overwritten");
    else
        PyErr_SetString(ring_corrupt, "ring header identity (version or data offset) was overwritten");
}

/* A slot's memoryview as a buffer held until PyBuffer_Release: 0, or -1 with the exception
 * that the Python drain's use of it would raise (a released view). */
static int hold_view(PyObject *self, int which, Py_buffer *buffer)
{
    PyObject *view = slot_value(self, &consumer_slots, which);
    return view == NULL ? -1 : PyObject_GetBuffer(view, buffer, PyBUF_WRITABLE);
}

static PyObject *ring_drain(PyObject *self, PyObject *fd_obj)
{
    Py_buffer header, area;
    PyObject *tail_obj, *capacity_obj, *result = NULL;
    unsigned long long tail, capacity;
    uint64_t head, written = 0;
    struct iovec span[2];
    int fd = PyObject_AsFileDescriptor(fd_obj);
    if (fd < 0)
        return NULL;
    if ((tail_obj = slot_value(self, &consumer_slots, CONSUMER_TAIL)) == NULL
        || (capacity_obj = slot_value(self, &consumer_slots, CONSUMER_CAPACITY)) == NULL)
        return NULL;
    if ((tail = PyLong_AsUnsignedLongLong(tail_obj)) == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if ((capacity = PyLong_AsUnsignedLongLong(capacity_obj)) == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (hold_view(self, CONSUMER_WORDS, &header) < 0)
        return NULL;
    if (hold_view(self, CONSUMER_DATA, &area) < 0) {
        PyBuffer_Release(&header);
        return NULL;
    }
    if (capacity == 0 || (capacity & (capacity - 1)) || (unsigned long long)area.len != capacity
        || header.len < (Py_ssize_t)sizeof(struct offlog_ring_header) || (uintptr_t)header.buf % 8) {
        PyErr_SetString(PyExc_ValueError, "the consumer's views do not describe a ring");
        goto done;
    }
    enum offlog_available found = offlog_ring_available(header.buf, capacity, tail, &head);
    if (found != OFFLOG_AVAILABLE) {
        raise_corrupt(found, head, tail, capacity);
        goto done;
    }
    int status = write_whole(fd, span, offlog_ring_pieces(area.buf, capacity, tail, head, span), &written);
    if (status < 0) {
        if (status == -1)
            raise_write_error(written);
        goto done;
    }
    PyObject *position = PyLong_FromUnsignedLongLong(head);
    if (position == NULL)
        goto done;
    offlog_ring_release(header.buf, head);
    Py_SETREF(*slot(self, &consumer_slots, CONSUMER_TAIL), position);
    result = PyLong_FromUnsignedLongLong(head - tail);
done:
    PyBuffer_Release(&area);
    PyBuffer_Release(&header);
    return result;
}

static PyMethodDef drain_def = {
    "drain",
    (PyCFunction)ring_drain,
    METH_O,
    "drain(fd): the server's hot path in C (offlog/_speedups.c); offlog.shm.ring.python_drain is the reference.",
};

static PyObject *consumer_drain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "consumer_drain() takes the Consumer class and RingCorrupt");
        return NULL;
    }
    if (find_slots(args[0], &consumer_slots) < 0)
        return NULL;
    Py_INCREF(args[1]);
    Py_XSETREF(ring_corrupt, args[1]);
    return PyDescr_NewMethod((PyTypeObject *)args[0], &drain_def);
}

static PyObject *fence(PyObject *module, PyObject *unused)
{
    atomic_thread_fence(memory_order_acq_rel);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"producer_write", producer_write, METH_O,
     "producer_write(Producer): the C write, a method descriptor for the class Producer."},
    {"consumer_drain", (PyCFunction)(void (*)(void))consumer_drain, METH_FASTCALL,
     "consumer_drain(Consumer, RingCorrupt): the C drain, a method descriptor for the class Consumer."},
    {"fence", fence, METH_NOARGS,
     "fence(): an acquire-release fence, for the Python paths' plain header loads and stores."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "offlog._speedups",
    "The ring's hot paths in C; offlog/shm/ring.py is the reference and the fallback.",
    -1,
    module_methods,
};

/* The ring core's constants under offlog/shm/layout.py's names (tests compare the two). */
static int add_layout(PyObject *module)
{
    static const struct {
        const char *name;
        unsigned long long value;
    } constants[] = {
        {"MAGIC", OFFLOG_MAGIC},
        {"VERSION", OFFLOG_VERSION},
        {"MAGIC_WORD", OFFLOG_MAGIC_WORD},
        {"VERSION_WORD", OFFLOG_VERSION_WORD},
        {"CAPACITY_WORD", OFFLOG_CAPACITY_WORD},
        {"DATA_OFFSET_WORD", OFFLOG_DATA_OFFSET_WORD},
        {"HEAD_WORD", OFFLOG_HEAD_WORD},
        {"TAIL_WORD", OFFLOG_TAIL_WORD},
        {"STATE_WORD", OFFLOG_STATE_WORD},
        {"ERRNO_WORD", OFFLOG_ERRNO_WORD},
        {"DOORBELL_OFFSET", OFFLOG_DOORBELL_OFFSET},
        {"DOORBELL_SIZE", OFFLOG_DOORBELL_SIZE},
        {"HEADER_SIZE", OFFLOG_HEADER_SIZE},
        {"DATA_OFFSET", OFFLOG_DATA_OFFSET},
        {"AWAKE", OFFLOG_AWAKE},
        {"SLEEPING", OFFLOG_SLEEPING},
        {"FAILED", OFFLOG_FAILED},
    };
    PyObject *layout = PyDict_New();
    if (layout == NULL)
        return -1;
    for (size_t i = 0; i < sizeof(constants) / sizeof(constants[0]); i++) {
        PyObject *value = PyLong_FromUnsignedLongLong(constants[i].value);
        if (value == NULL || PyDict_SetItemString(layout, constants[i].name, value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(layout);
            return -1;
        }
        Py_DECREF(value);
    }
    if (PyModule_AddObject(module, "LAYOUT", layout) < 0) {
        Py_DECREF(layout);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL)
        return NULL;
    PyObject *deque = PyObject_GetAttrString(collections, "deque");
    Py_DECREF(collections);
    if (deque == NULL)
        return NULL;
    deque_pop = PyObject_GetAttrString(deque, "pop");
    deque_append = PyObject_GetAttrString(deque, "append");
    Py_DECREF(deque);
    if (deque_pop == NULL || deque_append == NULL)
        return NULL;
    str_write_slow = PyUnicode_InternFromString("_write_slow");
    str_wake_or_fail = PyUnicode_InternFromString("_wake_or_fail");
    str_resync = PyUnicode_InternFromString("_resync");
    str_characters_written = PyUnicode_InternFromString("characters_written");
    if (str_write_slow == NULL || str_wake_or_fail == NULL || str_resync == NULL || str_characters_written == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module != NULL && add_layout(module) < 0)
        Py_CLEAR(module);
    return module;
}
