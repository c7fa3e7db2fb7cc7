/* otel_ctxbridge._speedups: the compiled form of ScopeCore (entering and leaving a scope).
 *
 * The pure-Python ScopeCore in _scope.py is the reference: this file does the same for
 * the common case (every value a plain printable str of a propagated field, no pending
 * update to catch up) and hands every other case to the Python derive_context, so errors
 * (UnknownFieldError, ContextValueError) and rare paths are written once, in Python.
 * tests/test_speedups.py checks both give the same contexts.
 *
 * configure() receives the Python objects this module needs (OTel's context variable, the
 * Context class, the derive and stamp functions, ...) once, from _scope.py.
 *
 * One translation unit: this file holds the shared declarations, configure(), the module's
 * functions and its set-up, and includes the parts, each where its definitions are needed:
 * _speedups_state.h (State), _speedups_scope_state.h (what a `with` block holds),
 * _speedups_derive.h (the common case of derive_context),
 * _speedups_stand.h (noticing a replaced bridge method), _speedups_scope.h (ScopeMaker,
 * ScopeCore), _speedups_getter.h (FieldGetter), _speedups_span.h (writing onto SDK spans),
 * _speedups_headers.h (the loops over ASGI header lists).
 */
#define PY_SSIZE_T_CLEAN
/* What _accel.py expects: a module built from other sources (a stale in-place build) whose
 * API differs is not used. Raise it whenever the Python side starts relying on a change. */
#define SPEEDUPS_API 14
#include <Python.h>
#include <structmember.h>

typedef struct {
    PyObject *var;               /* OTel's runtime ContextVar */
    PyObject *context_type;      /* opentelemetry.context.Context */
    PyObject *baggage_key;       /* the context key of OTel baggage */
    PyObject *span_key;          /* the context key of the current span */
    PyObject *derive;            /* _derive.derive_context(bridge, ctx, values) */
    PyObject *stamp;             /* _scope.stamp(bridge, span, values) */
    PyObject *detach_failed;     /* _runtime.detach_failed() */
    PyObject *child_state;       /* _state.child_state(parent, local, frame) */
    PyObject *empty;             /* _state.EMPTY */
    PyObject *may_exceed_limits; /* limits.may_exceed_limits(bag) */
    Py_ssize_t member_limit;     /* limits.MAX_MEMBER_BYTES */
    PyObject *scope_signature;   /* inspect.Signature of bridge.scope */
    PyObject *get_signature;     /* inspect.Signature of bridge.get */
    PyObject *bounded_type;      /* opentelemetry.attributes.BoundedAttributes */
    PyObject *span_type;         /* the SDK's span class (opentelemetry.sdk.trace._Span) */
    PyObject *lock_type;         /* type(threading.Lock()) */
} Config;

/* The exception being raised, held aside while clean-up code runs, then restored or dropped.
 * (PyErr_Fetch and PyErr_Restore are deprecated from Python 3.12, which holds it as one
 * object.) */
#if PY_VERSION_HEX >= 0x030C0000
typedef struct {
    PyObject *exc;
} HeldError;
static inline HeldError
hold_error(void)
{
    HeldError held = {PyErr_GetRaisedException()};
    return held;
}
static inline void
restore_error(HeldError held)
{
    PyErr_SetRaisedException(held.exc);
}
static inline void
drop_error(HeldError held)
{
    Py_XDECREF(held.exc);
}
#else
typedef struct {
    PyObject *type, *value, *tb;
} HeldError;
static inline HeldError
hold_error(void)
{
    HeldError held;
    PyErr_Fetch(&held.type, &held.value, &held.tb);
    return held;
}
static inline void
restore_error(HeldError held)
{
    PyErr_Restore(held.type, held.value, held.tb);
}
static inline void
drop_error(HeldError held)
{
    Py_XDECREF(held.type);
    Py_XDECREF(held.value);
    Py_XDECREF(held.tb);
}
#endif

static Config config;
static int configured = 0;
static PyTypeObject *state_type;      /* State, below */
static PyTypeObject *maker_type;      /* ScopeMaker, below */
static PyObject *empty_tuple;
static PyObject *no_trace_headers; /* ((), ()): trace_headers() for a request without any */
static int context_is_plain = 0; /* Context keeps dict's __new__ and __init__ (configure) */

static PyObject *str_key;      /* "_key" */
static PyObject *str_plans;    /* "_plans" */
static PyObject *str_frame;    /* "frame" */
static PyObject *str_updates;  /* "updates" */
static PyObject *zero;         /* 0 */
static PyObject *str_get;      /* "get" */
static PyObject *str_scope;    /* "scope" */
static PyObject *str_span_attributes; /* "_attributes" */
static PyObject *str_max_value_len;   /* "max_value_len" */
static PyObject *str_maxlen;          /* "maxlen" */
static PyObject *str_dict;            /* "_dict" */
static PyObject *str_lock;            /* "_lock" */
static PyObject *str_acquire;         /* "acquire" */
static PyObject *str_release;         /* "release" */
static PyObject *str_locked;          /* "locked" */
static PyObject *str_headers;         /* "headers" */
static PyObject *str_end_time;        /* "_end_time" */
static PyObject *str_name;            /* "_name" */


#include "_speedups_state.h"

#include "_speedups_scope_state.h"

#include "_speedups_derive.h"

#include "_speedups_stand.h"

#include "_speedups_scope.h"

#include "_speedups_getter.h"

/* derive(key, plans, ctx, values, frame): _derive.derive_context's common case, or None. */
static PyObject *
derive(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "derive() takes 5 arguments");
        return NULL;
    }
    if (!configured) {
        Py_RETURN_NONE;
    }
    PyObject *frame = args[4] == Py_None ? NULL : args[4];
    PyObject *new = fast_derive(args[0], args[1], args[2], args[3], frame, NULL);
    if (new == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return new;
}

/* uuid4_texts(raw): the canonical text of a version-4 UUID made of each 16 bytes of raw. */
static PyObject *
uuid4_texts(PyObject *Py_UNUSED(module), PyObject *raw)
{
    static const char hex[] = "0123456789abcdef";
    static const int dashes_after[] = {4, 6, 8, 10}; /* byte indexes a dash precedes */
    if (!PyBytes_Check(raw) || PyBytes_GET_SIZE(raw) % 16 != 0) {
        PyErr_SetString(PyExc_ValueError, "uuid4_texts() takes bytes, 16 for each id");
        return NULL;
    }
    Py_ssize_t count = PyBytes_GET_SIZE(raw) / 16;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(raw);
    PyObject *texts = PyList_New(count);
    if (texts == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned char id[16];
        memcpy(id, data + 16 * i, 16);
        id[6] = (unsigned char)((id[6] & 0x0F) | 0x40); /* version 4 */
        id[8] = (unsigned char)((id[8] & 0x3F) | 0x80); /* RFC 4122 variant */
        PyObject *text = PyUnicode_New(36, 127);
        if (text == NULL) {
            Py_DECREF(texts);
            return NULL;
        }
        Py_UCS1 *out = PyUnicode_1BYTE_DATA(text);
        int dash = 0;
        for (int b = 0; b < 16; b++) {
            if (dash < 4 && b == dashes_after[dash]) {
                *out++ = '-';
                dash++;
            }
            *out++ = (Py_UCS1)hex[id[b] >> 4];
            *out++ = (Py_UCS1)hex[id[b] & 0x0F];
        }
        PyList_SET_ITEM(texts, i, text);
    }
    return texts;
}

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"var",           "context_type", "baggage_key", "span_key",
                            "derive",        "stamp",        "detach_failed", "child_state",
                            "empty",         "may_exceed_limits", "member_limit",
                            "scope_signature", "get_signature", "bounded_type",
                            "span_type",     "lock_type",    NULL};
    Config given;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "$OOUUOOOOOOnOOOOO:configure", names, &given.var, &given.context_type,
            &given.baggage_key, &given.span_key, &given.derive, &given.stamp,
            &given.detach_failed, &given.child_state, &given.empty,
            &given.may_exceed_limits, &given.member_limit, &given.scope_signature,
            &given.get_signature, &given.bounded_type, &given.span_type, &given.lock_type)) {
        return NULL;
    }
    if (!PyType_Check(given.context_type) ||
        !PyType_IsSubtype((PyTypeObject *)given.context_type, &PyDict_Type)) {
        PyErr_SetString(PyExc_TypeError, "context_type must be a dict subclass");
        return NULL;
    }
    PyTypeObject *context_type = (PyTypeObject *)given.context_type;
    context_is_plain = context_type->tp_new == PyDict_Type.tp_new &&
                       context_type->tp_init == PyDict_Type.tp_init;
    if (!PyContextVar_CheckExact(given.var)) {
        PyErr_SetString(PyExc_TypeError, "var must be a contextvars.ContextVar");
        return NULL;
    }
    PyObject **objects[] = {&given.var,    &given.context_type,  &given.baggage_key,
                            &given.span_key, &given.derive,      &given.stamp,
                            &given.detach_failed, &given.child_state,
                            &given.empty,  &given.may_exceed_limits,
                            &given.scope_signature, &given.get_signature,
                            &given.bounded_type, &given.span_type, &given.lock_type};
    for (size_t i = 0; i < sizeof(objects) / sizeof(objects[0]); i++) {
        Py_INCREF(*objects[i]);
    }
    if (configured) {
        PyObject **old[] = {&config.var,    &config.context_type,  &config.baggage_key,
                            &config.span_key, &config.derive,      &config.stamp,
                            &config.detach_failed, &config.child_state,
                            &config.empty,  &config.may_exceed_limits,
                            &config.scope_signature, &config.get_signature,
                            &config.bounded_type, &config.span_type, &config.lock_type};
        for (size_t i = 0; i < sizeof(old) / sizeof(old[0]); i++) {
            Py_DECREF(*old[i]);
        }
    }
    config = given;
    configured = 1;
    Py_RETURN_NONE;
}

#include "_speedups_span.h"

#include "_speedups_headers.h"

#include "_speedups_response.h"

static PyMethodDef module_methods[] = {
    {"collect_headers", (PyCFunction)(void (*)(void))collect_headers, METH_FASTCALL,
     "collect_headers(headers, wanted): {name: [values]} of the wanted headers, None when "
     "none is there, NotImplemented for a shape the Python code handles."},
    {"trace_headers", (PyCFunction)(void (*)(void))trace_headers, METH_FASTCALL,
     "trace_headers(headers, others): (traceparent values, tracestate values) when no header "
     "is named in others or has a backslash; None when one does, or for another shape."},
    {"traceparent_ready", (PyCFunction)traceparent_ready, METH_O,
     "traceparent_ready(value): True when the traceparent bytes are already normalised "
     "(version 00, lower-case hex, ids not all zeros)."},
    {"request_id_ready", (PyCFunction)(void (*)(void))request_id_ready, METH_FASTCALL,
     "request_id_ready(raw, max_length): the text of a safe request-id token of at most "
     "max_length characters, else None."},
    {"append_header", (PyCFunction)(void (*)(void))append_header, METH_FASTCALL,
     "append_header(message, name, value): add the header unless it is there (True), None "
     "for a shape the Python code handles."},
    {"write_span", (PyCFunction)(void (*)(void))write_span, METH_FASTCALL,
     "write_span(span, attributes, overwrite, expected, name, renamed): the direct path of _span_write (True), or "
     "False when the caller must take the public one."},
    {"response_started", (PyCFunction)(void (*)(void))response_started, METH_FASTCALL,
     "response_started(exchange, message): Exchange._started's common case (True), or "
     "NotImplemented when the Python code must do it."},
    {"stamp_plain", (PyCFunction)(void (*)(void))stamp_plain, METH_FASTCALL,
     "stamp_plain(span, plain, values): the common case of stamping a recording span (True), "
     "or NotImplemented when the Python code must do it."},
    {"uuid4_texts", uuid4_texts, METH_O,
     "uuid4_texts(raw): the text of a version-4 UUID for each 16 bytes of raw (random bytes)."},
    {"derive", (PyCFunction)(void (*)(void))derive, METH_FASTCALL,
     "derive(key, plans, ctx, values, frame): the common case of _derive.derive_context (a new "
     "context), or None when the Python code must handle it."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "Give the module the objects it works with (called once by otel_ctxbridge._scope)."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    if (state_type != NULL) { /* its state is process-wide: one module, one interpreter */
        PyErr_SetString(PyExc_ImportError,
                        "otel_ctxbridge._speedups is loaded once a process (no re-import, no "
                        "subinterpreters); the pure-Python code serves instead");
        return -1;
    }
    if (zero == NULL) {
        str_key = PyUnicode_InternFromString("_key");
        str_plans = PyUnicode_InternFromString("_plans");
        str_frame = PyUnicode_InternFromString("frame");
        str_span_attributes = PyUnicode_InternFromString("_attributes");
        str_max_value_len = PyUnicode_InternFromString("max_value_len");
        str_maxlen = PyUnicode_InternFromString("maxlen");
        str_dict = PyUnicode_InternFromString("_dict");
        str_lock = PyUnicode_InternFromString("_lock");
        str_acquire = PyUnicode_InternFromString("acquire");
        str_release = PyUnicode_InternFromString("release");
        str_locked = PyUnicode_InternFromString("locked");
        str_headers = PyUnicode_InternFromString("headers");
        str_end_time = PyUnicode_InternFromString("_end_time");
        str_name = PyUnicode_InternFromString("_name");
        str_updates = PyUnicode_InternFromString("updates");
        str_last = PyUnicode_InternFromString("_last");
        str_get = PyUnicode_InternFromString("get");
        str_scope = PyUnicode_InternFromString("scope");
        zero = PyLong_FromLong(0);
        if (response_strings() < 0) {
            Py_CLEAR(zero);
            return -1;
        }
        if (!str_key || !str_plans || !str_frame || !str_updates || !str_last ||
            !str_get || !str_scope || !str_span_attributes || !str_max_value_len ||
            !str_maxlen || !str_dict || !str_lock || !str_acquire || !str_release || !str_locked || !str_headers ||
            !str_end_time || !str_name || !zero) {
            Py_CLEAR(zero);
            return -1;
        }
    }
    if (empty_tuple == NULL && (empty_tuple = PyTuple_New(0)) == NULL) {
        return -1;
    }
    if (no_trace_headers == NULL &&
        (no_trace_headers = PyTuple_Pack(2, empty_tuple, empty_tuple)) == NULL) {
        return -1;
    }
    state_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &state_spec, NULL);
    if (state_type == NULL || PyModule_AddObjectRef(module, "State", (PyObject *)state_type) < 0) {
        return -1;
    }
    scope_state_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &scope_state_spec,
                                                                (PyObject *)&PyDict_Type);
    if (scope_state_type == NULL ||
        PyModule_AddObjectRef(module, "ScopeState", (PyObject *)scope_state_type) < 0) {
        return -1;
    }
    maker_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &maker_spec, NULL);
    if (maker_type == NULL ||
        PyModule_AddObjectRef(module, "ScopeMaker", (PyObject *)maker_type) < 0) {
        return -1;
    }
    PyObject *getter_type = PyType_FromModuleAndSpec(module, &getter_spec, NULL);
    int added = getter_type == NULL ? -1 : PyModule_AddObjectRef(module, "FieldGetter", getter_type);
    Py_XDECREF(getter_type);
    if (added < 0 || PyModule_AddIntConstant(module, "API", SPEEDUPS_API) < 0) {
        return -1;
    }
    scope_core_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &scope_spec, NULL);
    if (scope_core_type == NULL ||
        PyModule_AddObjectRef(module, "ScopeCore", (PyObject *)scope_core_type) < 0) {
        return -1;
    }
    /* ScopeCore.__exit__ is a ScopeExit (see _speedups_scope.h), put in the type's dict
     * before any subclass exists. */
    PyObject *exit_type = PyType_FromModuleAndSpec(module, &scope_exit_spec, NULL);
    PyObject *scope_exit = exit_type == NULL ? NULL : ((PyTypeObject *)exit_type)->tp_alloc(
                                                          (PyTypeObject *)exit_type, 0);
    Py_XDECREF(exit_type);
    added = scope_exit == NULL ? -1
                               : PyDict_SetItemString(scope_core_type->tp_dict, "__exit__",
                                                      scope_exit);
    Py_XDECREF(scope_exit);
    if (added < 0) {
        return -1;
    }
    PyType_Modified(scope_core_type);
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "otel_ctxbridge._speedups",
    .m_doc = "Compiled scope entry and exit for otel_ctxbridge (optional; see _scope.py).",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module_def);
}
