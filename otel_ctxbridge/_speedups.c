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
 */
#define PY_SSIZE_T_CLEAN
/* What _accel.py expects: a module built from other sources (a stale in-place build) whose
 * API differs is not used. Raise it whenever the Python side starts relying on a change. */
#define SPEEDUPS_API 10
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
static PyObject *str_local;    /* "local" */
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


/* State: what _state.PyState is (the process-local values of a context, its frame and
 * when it was written), as a compiled type that C code creates without a Python call. */
typedef struct {
    PyObject_HEAD
    PyObject *local;
    PyObject *frame;
    PyObject *generation;
} State;

static PyObject *
new_state(PyObject *local, PyObject *frame, PyObject *generation)
{
    State *state = PyObject_GC_New(State, state_type);
    if (state == NULL) {
        return NULL;
    }
    Py_INCREF(local);
    Py_INCREF(frame);
    Py_INCREF(generation);
    state->local = local;
    state->frame = frame;
    state->generation = generation;
    PyObject_GC_Track(state);
    return (PyObject *)state;
}

static PyObject *
state_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *local, *frame, *generation;
    static char *names[] = {"local", "frame", "generation", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:State", names, &local, &frame,
                                     &generation)) {
        return NULL;
    }
    if (type != state_type) {
        PyErr_SetString(PyExc_TypeError, "State cannot be subclassed");
        return NULL;
    }
    return new_state(local, frame, generation);
}

static int
state_traverse(State *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->local);
    Py_VISIT(self->frame);
    Py_VISIT(self->generation);
    return 0;
}

static int
state_clear(State *self)
{
    Py_CLEAR(self->local);
    Py_CLEAR(self->frame);
    Py_CLEAR(self->generation);
    return 0;
}

static void
state_dealloc(State *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    state_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMemberDef state_members[] = {
    {"local", T_OBJECT_EX, offsetof(State, local), READONLY, "The process-local values."},
    {"generation", T_OBJECT_EX, offsetof(State, generation), READONLY, "When it was written."},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *
state_get_frame(State *self, void *Py_UNUSED(closure))
{
    if (self->frame == NULL) {
        PyErr_SetString(PyExc_AttributeError, "frame");
        return NULL;
    }
    Py_INCREF(self->frame);
    return self->frame;
}

static int
state_set_frame(State *self, PyObject *frame, void *Py_UNUSED(closure))
{
    if (frame == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a State's frame cannot be deleted");
        return -1;
    }
    Py_INCREF(frame);
    Py_XSETREF(self->frame, frame);
    return 0;
}

static PyGetSetDef state_getset[] = {
    {"frame", (getter)state_get_frame, (setter)state_set_frame,
     "The frame update() writes in, or None (set once, by the first update).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot state_slots[] = {
    {Py_tp_doc, "The process-local values of a context, its frame and when it was written "
                "(compiled; see _state.PyState)."},
    {Py_tp_new, state_new},
    {Py_tp_dealloc, state_dealloc},
    {Py_tp_traverse, state_traverse},
    {Py_tp_clear, state_clear},
    {Py_tp_members, state_members},
    {Py_tp_getset, state_getset},
    {0, NULL},
};

static PyType_Spec state_spec = {
    .name = "otel_ctxbridge._speedups.State",
    .basicsize = sizeof(State),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = state_slots,
};

/* True when every character of `value` is printable (str.isprintable). */
static int
is_printable(PyObject *value)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(value);
    if (PyUnicode_IS_ASCII(value)) {
        const Py_UCS1 *data = PyUnicode_1BYTE_DATA(value);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (data[i] < 0x20 || data[i] > 0x7e) {
                return 0;
            }
        }
        return 1;
    }
    int kind = PyUnicode_KIND(value);
    const void *data = PyUnicode_DATA(value);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!Py_UNICODE_ISPRINTABLE(PyUnicode_READ(kind, data, i))) {
            return 0;
        }
    }
    return 1;
}

/* The State of a context written on top of one holding `state` (borrowed, may be NULL;
 * `parent_frame` is its frame) with no new process-local values, as _derive.derive_context
 * makes it; `frame` is the request frame to start (NULL: none). New reference or NULL. */
static PyObject *
derived_state(PyObject *state, PyObject *parent_frame, PyObject *frame)
{
    if (frame == NULL) {
        if (state == NULL) {
            return new_state(config.empty, Py_None, zero);
        }
        if (parent_frame == Py_None) {
            if (Py_TYPE(state) == state_type) {
                return new_state(((State *)state)->local, Py_None, zero);
            }
            PyObject *local = PyObject_GetAttr(state, str_local);
            if (local == NULL) {
                return NULL;
            }
            PyObject *result = new_state(local, Py_None, zero);
            Py_DECREF(local);
            return result;
        }
    }
    else if (frame != parent_frame && (state == NULL || Py_TYPE(state) == state_type)) {
        /* A request frame to start: fresh (no updates recorded yet), its state has generation
         * 0, as child_state() says. */
        PyObject *updates = PyObject_GetAttr(frame, str_updates);
        if (updates == NULL) {
            return NULL;
        }
        int fresh = updates == config.empty;
        Py_DECREF(updates);
        if (fresh) {
            return new_state(state != NULL ? ((State *)state)->local : config.empty, frame, zero);
        }
    }
    PyObject *args[3] = {state != NULL ? state : Py_None, Py_None, frame != NULL ? frame : Py_None};
    return PyObject_Vectorcall(config.child_state, args, 3, NULL);
}

/* Write `value` of field `name` into `bag` when it is a valid plain value of a propagated
 * field with the default or a regex check (see ContextBridge._plans). 1: written; 0: a case
 * for the Python path (unknown field, invalid value, ...); -1: an error (set). `name` and
 * `value` are exact str objects the caller holds. */
static int
write_value(PyObject *plans, PyObject *bag, PyObject *name, PyObject *value, Py_ssize_t *chars)
{
    PyObject *plan = PyDict_GetItemWithError(plans, name); /* an exact str: no Python code */
    if (plan == NULL) {
        return PyErr_Occurred() ? -1 : 0; /* an unknown field: the Python path names it */
    }
    if (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != 3) {
        return 0;
    }
    Py_INCREF(plan); /* held: a regex match may run a signal handler */
    int result = 0;
    PyObject *bag_key = PyTuple_GET_ITEM(plan, 0);
    PyObject *check = PyTuple_GET_ITEM(plan, 2);
    Py_ssize_t limit = PyLong_AsSsize_t(PyTuple_GET_ITEM(plan, 1));
    if (limit == -1 && PyErr_Occurred()) {
        result = -1;
        goto done;
    }
    if (bag_key == Py_None || check == Py_False || !PyUnicode_CheckExact(bag_key)) {
        goto done; /* process-local, or a callable validator: the Python path */
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(value) < 0 || PyUnicode_READY(bag_key) < 0) {
        result = -1;
        goto done;
    }
#endif
    Py_ssize_t length = PyUnicode_GET_LENGTH(value);
    if (length > limit) {
        goto done; /* invalid: the Python path raises ContextValueError */
    }
    if (check == Py_True) { /* the default check: printable text */
        if (!is_printable(value)) {
            goto done;
        }
    }
    else { /* a regex validator's fullmatch, for ASCII (others: UTF-8 checked first) */
        if (!PyUnicode_IS_ASCII(value)) {
            goto done;
        }
        PyObject *match = PyObject_CallOneArg(check, value);
        if (match == NULL) {
            /* Field.problem() reports a validator that raises as a ContextValueError */
            result = PyErr_ExceptionMatches(PyExc_Exception) ? (PyErr_Clear(), 0) : -1;
            goto done;
        }
        int valid = match != Py_None;
        Py_DECREF(match);
        if (!valid) {
            goto done;
        }
    }
    if (PyDict_SetItem(bag, bag_key, value) < 0) {
        result = -1;
        goto done;
    }
    if (*chars >= 0) {
        *chars += length + PyUnicode_GET_LENGTH(bag_key) + 2;
    }
    result = 1;
done:
    Py_DECREF(plan);
    return result;
}

/* derive_context's common case. Returns a new context, NULL with an exception set, or
 * NULL without one when the case is not common (the caller then runs the Python one). */
static PyObject *
fast_derive(PyObject *key, PyObject *plans, PyObject *ctx, PyObject *values, PyObject *frame_arg)
{
    PyObject *parent = NULL, *frame = NULL, *old = NULL, *bag = NULL, *state = NULL;
    PyObject *result = NULL, *name, *value;
    Py_ssize_t chars = 0; /* characters written, for the cheap limits bound; -1 unknown */
    Py_ssize_t pos = 0;
    int inherited, written;
    if (!context_is_plain || !PyDict_CheckExact(values) || PyDict_GET_SIZE(values) == 0 ||
        !PyDict_Check(ctx) || !PyDict_CheckExact(plans)) {
        return NULL; /* (no values: the Python path leaves the baggage as it is) */
    }
    parent = PyDict_GetItemWithError(ctx, key);
    if (parent == NULL && PyErr_Occurred()) {
        goto error;
    }
    if (parent == Py_None) {
        parent = NULL;
    }
    Py_XINCREF(parent); /* held: the calls below may run Python code */
    if (parent != NULL) {
        if (Py_TYPE(parent) == state_type) {
            frame = ((State *)parent)->frame;
            if (frame == NULL || ((State *)parent)->local == NULL) {
                goto not_handled; /* a state cleared by the garbage collector */
            }
            Py_INCREF(frame);
        }
        else if ((frame = PyObject_GetAttr(parent, str_frame)) == NULL) {
            goto error;
        }
        if (frame != Py_None) { /* updates to catch up: the Python path merges them */
            PyObject *updates = PyObject_GetAttr(frame, str_updates);
            if (updates == NULL) {
                goto error;
            }
            int pending = PyObject_IsTrue(updates);
            Py_DECREF(updates);
            if (pending != 0) {
                goto not_handled_or_error;
            }
        }
    }
    old = PyDict_GetItemWithError(ctx, config.baggage_key);
    if (old == NULL && PyErr_Occurred()) {
        goto error;
    }
    Py_XINCREF(old);
    inherited = old == NULL ? 0 : PyObject_IsTrue(old);
    if (inherited < 0) {
        goto error;
    }
    if (inherited) {
        if (!PyDict_Check(old)) {
            goto not_handled;
        }
        bag = PyDict_Copy(old);
        chars = -1;
    }
    else {
        bag = PyDict_New();
    }
    if (bag == NULL) {
        goto error;
    }
    while (PyDict_Next(values, &pos, &name, &value)) {
        if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(value)) {
            goto not_handled; /* unset (None), not a str, or a str subclass: Python */
        }
        Py_INCREF(name);
        Py_INCREF(value);
        written = write_value(plans, bag, name, value, &chars);
        Py_DECREF(name);
        Py_DECREF(value);
        if (written <= 0) {
            goto not_handled_or_error;
        }
    }
    if (chars < 0 || 12 * chars > config.member_limit) {
        PyObject *exceeds = PyObject_CallOneArg(config.may_exceed_limits, bag);
        if (exceeds == NULL) {
            goto error;
        }
        int unsure = PyObject_IsTrue(exceeds);
        Py_DECREF(exceeds);
        if (unsure != 0) {
            goto not_handled_or_error; /* the Python path checks the limits exactly */
        }
    }
    state = derived_state(parent, frame, frame_arg);
    if (state == NULL) {
        goto error;
    }
    /* Context(ctx): configure() checked that Context keeps dict's __new__ and __init__. */
    result = ((PyTypeObject *)config.context_type)->tp_new(
        (PyTypeObject *)config.context_type, empty_tuple, NULL);
    if (result == NULL) {
        goto error;
    }
    if (PyDict_Merge(result, ctx, 1) < 0 || PyDict_SetItem(result, config.baggage_key, bag) < 0 ||
        PyDict_SetItem(result, key, state) < 0) {
        goto error;
    }
    goto done;
not_handled_or_error:
    if (PyErr_Occurred()) {
        goto error;
    }
not_handled:
error:
    Py_CLEAR(result);
done:
    Py_XDECREF(parent);
    Py_XDECREF(frame);
    Py_XDECREF(old);
    Py_XDECREF(bag);
    Py_XDECREF(state);
    return result;
}

/* Stand: which method of the bridge's class a compiled callable stands in for, so that it
 * notices when the class's is replaced (mock.patch.object(ContextBridge, "get"), a
 * monkeypatched subclass) and then calls what the class has now, as a method would. */
typedef struct {
    PyObject *name;       /* "get" or "scope" */
    PyObject *original;   /* the function the class had; NULL: never replaced */
    unsigned int version; /* the class's version tag when it last had the original */
} Stand;

/* The attribute `name` of `type` as its class dictionaries hold it (borrowed), or NULL. */
static PyObject *
class_attribute(PyTypeObject *type, PyObject *name)
{
    PyObject *mro = type->tp_mro;
    if (mro == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyObject *dict = ((PyTypeObject *)PyTuple_GET_ITEM(mro, i))->tp_dict;
        if (dict == NULL) { /* a static builtin type on 3.12+: not where methods are */
            continue;
        }
        PyObject *found = PyDict_GetItemWithError(dict, name);
        if (found != NULL || PyErr_Occurred()) {
            return found;
        }
    }
    return NULL;
}

/* 1: `instance`'s class still has the original method; 0: it has another; -1: an error. */
static int
stand_holds(Stand *stand, PyObject *instance)
{
    PyTypeObject *type = Py_TYPE(instance);
    if (stand->original == NULL) {
        return 1;
    }
    if (stand->version != 0 && (type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) &&
        type->tp_version_tag == stand->version) {
        return 1; /* the class has not changed since */
    }
    PyObject *found = class_attribute(type, stand->name);
    if (found == NULL && PyErr_Occurred()) {
        return -1;
    }
    if (found != stand->original) {
        return 0;
    }
    if (type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) {
        stand->version = type->tp_version_tag;
    }
    return 1;
}

/* Call what `instance`'s class has now under the stand's name, bound as a method. */
static PyObject *
call_replacement(Stand *stand, PyObject *instance, PyObject *const *args, size_t nargsf,
                 PyObject *kwnames)
{
    PyTypeObject *type = Py_TYPE(instance);
    PyObject *found = class_attribute(type, stand->name);
    if (found == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_AttributeError, stand->name);
        }
        return NULL;
    }
    Py_INCREF(found);
    PyObject *callable = found;
    descrgetfunc bind = Py_TYPE(found)->tp_descr_get;
    if (bind != NULL) {
        callable = bind(found, instance, (PyObject *)type);
        Py_DECREF(found);
        if (callable == NULL) {
            return NULL;
        }
    }
    PyObject *result = PyObject_Vectorcall(callable, args, nargsf, kwnames);
    Py_DECREF(callable);
    return result;
}

/* ScopeMaker: what bridge.scope is when this module is built, a callable made once per
 * bridge that holds what entering needs (the bridge's context key and field plans). */
typedef struct {
    PyObject_HEAD
    PyObject *bridge;
    PyObject *key;        /* bridge._key */
    PyObject *plans;      /* bridge._plans */
    PyTypeObject *scope;  /* the class of the scopes it makes (_scope.Scope) */
    Stand stand;          /* ContextBridge.scope */
    vectorcallfunc vectorcall;
} ScopeMaker;

typedef struct {
    PyObject_HEAD
    ScopeMaker *maker;
    PyObject *values; /* None once entered */
    PyObject *token;  /* the ContextVar token while entered, else NULL */
} ScopeCore;

static PyTypeObject *scope_core_type; /* ScopeCore, below */
static PyObject *maker_vectorcall(ScopeMaker *, PyObject *const *, size_t, PyObject *);

static PyObject *
new_maker(PyObject *bridge, PyTypeObject *scope)
{
    if (!PyType_IsSubtype(scope, scope_core_type)) {
        PyErr_SetString(PyExc_TypeError, "scope_type must be a subclass of ScopeCore");
        return NULL;
    }
    PyObject *key = PyObject_GetAttr(bridge, str_key);
    if (key == NULL) {
        return NULL;
    }
    PyObject *plans = PyObject_GetAttr(bridge, str_plans);
    if (plans == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    ScopeMaker *maker = PyObject_GC_New(ScopeMaker, maker_type);
    if (maker == NULL) {
        Py_DECREF(key);
        Py_DECREF(plans);
        return NULL;
    }
    Py_INCREF(bridge);
    Py_INCREF(scope);
    maker->bridge = bridge;
    maker->key = key;
    maker->plans = plans;
    maker->scope = scope;
    maker->stand.name = str_scope;
    maker->stand.original = NULL;
    maker->stand.version = 0;
    maker->vectorcall = (vectorcallfunc)maker_vectorcall;
    PyObject_GC_Track(maker);
    return (PyObject *)maker;
}

static PyObject *
new_scope(ScopeMaker *maker, PyObject *values)
{
    ScopeCore *scope = (ScopeCore *)maker->scope->tp_alloc(maker->scope, 0);
    if (scope == NULL) {
        return NULL;
    }
    Py_INCREF(maker);
    Py_INCREF(values);
    scope->maker = maker;
    scope->values = values;
    scope->token = NULL;
    return (PyObject *)scope;
}

static PyObject *
maker_new(PyTypeObject *Py_UNUSED(type), PyObject *args, PyObject *kwargs)
{
    PyObject *bridge, *scope, *original = NULL;
    static char *names[] = {"bridge", "scope_type", "original", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!|O:ScopeMaker", names, &bridge,
                                     &PyType_Type, &scope, &original)) {
        return NULL;
    }
    ScopeMaker *maker = (ScopeMaker *)new_maker(bridge, (PyTypeObject *)scope);
    if (maker != NULL && original != NULL && original != Py_None) {
        Py_INCREF(original);
        maker->stand.original = original;
    }
    return (PyObject *)maker;
}

/* bridge.scope(**values): a new scope of the values (keywords only), in a dict of its own. */
static PyObject *
maker_vectorcall(ScopeMaker *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    int holds = self->bridge == NULL ? -1 : stand_holds(&self->stand, self->bridge);
    if (holds <= 0) {
        return holds < 0 ? NULL : call_replacement(&self->stand, self->bridge, args, nargsf, kwnames);
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 0) {
        PyErr_SetString(PyExc_TypeError,
                        "scope() takes field values as keyword arguments only");
        return NULL;
    }
    PyObject *values = PyDict_New();
    if (values == NULL) {
        return NULL;
    }
    Py_ssize_t count = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < count; i++) {
        if (PyDict_SetItem(values, PyTuple_GET_ITEM(kwnames, i), args[i]) < 0) {
            Py_DECREF(values);
            return NULL;
        }
    }
    PyObject *scope = new_scope(self, values);
    Py_DECREF(values);
    return scope;
}

static int
maker_traverse(ScopeMaker *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->bridge);
    Py_VISIT(self->key);
    Py_VISIT(self->plans);
    Py_VISIT(self->scope);
    Py_VISIT(self->stand.original);
    return 0;
}

static int
maker_clear(ScopeMaker *self)
{
    Py_CLEAR(self->bridge);
    Py_CLEAR(self->key);
    Py_CLEAR(self->plans);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->stand.original);
    return 0;
}

static void
maker_dealloc(ScopeMaker *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    maker_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* __signature__ of the compiled bridge.scope and bridge.get, for inspect.signature(). */
static PyObject *
signature_of(PyObject *Py_UNUSED(self), void *closure)
{
    PyObject *signature = configured ? *(PyObject **)closure : Py_None;
    Py_INCREF(signature);
    return signature;
}

static PyGetSetDef maker_getset[] = {
    {"__signature__", signature_of, NULL, NULL, &config.scope_signature},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyGetSetDef getter_getset[] = {
    {"__signature__", signature_of, NULL, NULL, &config.get_signature},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef maker_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(ScopeMaker, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot maker_slots[] = {
    {Py_tp_doc, "scope(**values): a scope setting the values (None unsets a field); see "
                "ContextBridge.scope."},
    {Py_tp_new, maker_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, maker_members},
    {Py_tp_getset, maker_getset},
    {Py_tp_dealloc, maker_dealloc},
    {Py_tp_traverse, maker_traverse},
    {Py_tp_clear, maker_clear},
    {0, NULL},
};

static PyType_Spec maker_spec = {
    .name = "otel_ctxbridge._speedups.ScopeMaker",
    .basicsize = sizeof(ScopeMaker),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = maker_slots,
};

/* ScopeCore(bridge, values): the slower way in, for code that builds a Scope itself. */
static int
scope_init(ScopeCore *self, PyObject *args, PyObject *kwargs)
{
    PyObject *bridge, *values;
    static char *names[] = {"bridge", "values", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:ScopeCore", names, &bridge, &values)) {
        return -1;
    }
    PyObject *maker = new_maker(bridge, Py_TYPE(self));
    if (maker == NULL) {
        return -1;
    }
    Py_INCREF(values);
    Py_XSETREF(self->maker, (ScopeMaker *)maker);
    Py_XSETREF(self->values, values);
    Py_CLEAR(self->token);
    return 0;
}

static PyObject *
scope_enter(ScopeCore *self, PyObject *Py_UNUSED(ignored))
{
    if (!configured || self->maker == NULL || self->maker->key == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this scope was not made by bridge.scope()");
        return NULL;
    }
    if (self->token != NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this scope is already entered; call bridge.scope() again");
        return NULL;
    }
    if (self->values == NULL || self->values == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "a scope is entered once; call bridge.scope() again");
        return NULL;
    }
    PyObject *ctx = NULL, *new = NULL, *token = NULL, *span = NULL, *result = NULL;
    if (PyContextVar_Get(config.var, NULL, &ctx) < 0) {
        return NULL;
    }
    if (ctx == NULL) {
        PyErr_SetString(PyExc_LookupError, "OpenTelemetry's context variable has no value");
        return NULL;
    }
    ScopeMaker *maker = self->maker; /* held, with the values, while Python code may run */
    PyObject *values = self->values;
    Py_INCREF(maker);
    Py_INCREF(values);
    new = fast_derive(maker->key, maker->plans, ctx, values, NULL);
    if (new == NULL && !PyErr_Occurred()) {
        PyObject *args[3] = {maker->bridge, ctx, values};
        new = PyObject_Vectorcall(config.derive, args, 3, NULL);
    }
    if (new == NULL) {
        goto done;
    }
    if (self->token != NULL) { /* entered meanwhile (by a validator, say) */
        PyErr_SetString(PyExc_RuntimeError,
                        "this scope is already entered; call bridge.scope() again");
        goto done;
    }
    token = PyContextVar_Set(config.var, new);
    if (token == NULL) {
        goto done;
    }
    self->token = token; /* the scope's from here */
    token = NULL;
    Py_INCREF(Py_None);
    Py_SETREF(self->values, Py_None); /* an in-flight request keeps only the token alive */
    span = PyDict_Check(new) ? PyDict_GetItemWithError(new, config.span_key) : NULL;
    if (span == NULL && PyErr_Occurred()) {
        PyErr_Clear(); /* telemetry never throws: an odd context is not stamped */
    }
    if (span != NULL && span != Py_None) {
        PyObject *args[3] = {maker->bridge, span, values};
        PyObject *stamped = PyObject_Vectorcall(config.stamp, args, 3, NULL);
        if (stamped == NULL) { /* stamp() catches Exception: only BaseException lands here */
            PyObject *exc_type, *exc, *tb; /* the scope is not entered: detach, re-raise */
            PyErr_Fetch(&exc_type, &exc, &tb);
            token = self->token;
            self->token = NULL;
            if (token != NULL && PyContextVar_Reset(config.var, token) < 0) {
                PyErr_Clear();
            }
            PyErr_Restore(exc_type, exc, tb);
            goto done;
        }
        Py_DECREF(stamped);
    }
    Py_INCREF(self);
    result = (PyObject *)self;
done:
    Py_DECREF(ctx);
    Py_XDECREF(new);
    Py_XDECREF(token);
    Py_DECREF(values);
    Py_DECREF(maker);
    return result;
}

static PyObject *
scope_exit(ScopeCore *self, PyObject *const *Py_UNUSED(args), Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "__exit__() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *token = self->token;
    if (token == NULL) {
        Py_RETURN_NONE;
    }
    self->token = NULL;
    int failed = PyContextVar_Reset(config.var, token);
    Py_DECREF(token);
    if (failed < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError) &&
            !PyErr_ExceptionMatches(PyExc_RuntimeError)) {
            return NULL;
        }
        PyErr_Clear(); /* a token of another context: counted and logged, never raised */
        return PyObject_CallNoArgs(config.detach_failed);
    }
    Py_RETURN_NONE;
}

static PyObject *
scope_get_bridge(ScopeCore *self, void *Py_UNUSED(closure))
{
    if (self->maker == NULL) {
        Py_RETURN_NONE;
    }
    Py_INCREF(self->maker->bridge);
    return self->maker->bridge;
}

static int
scope_traverse(ScopeCore *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->maker);
    Py_VISIT(self->values);
    Py_VISIT(self->token);
    return 0;
}

static int
scope_clear(ScopeCore *self)
{
    Py_CLEAR(self->maker);
    Py_CLEAR(self->values);
    Py_CLEAR(self->token);
    return 0;
}

static void
scope_dealloc(ScopeCore *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    scope_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMethodDef scope_methods[] = {
    {"__enter__", (PyCFunction)scope_enter, METH_NOARGS,
     "Attach a context holding the values on top of the current one; return the scope."},
    {"__exit__", (PyCFunction)(void (*)(void))scope_exit, METH_FASTCALL,
     "Restore the context from before the scope."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef scope_members[] = {
    {"_values", T_OBJECT, offsetof(ScopeCore, values), READONLY,
     "The values to set; None once entered."},
    {"_token", T_OBJECT, offsetof(ScopeCore, token), READONLY,
     "The token of the attached context while entered, else None."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef scope_getset[] = {
    {"_bridge", (getter)scope_get_bridge, NULL, "The bridge of the scope.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot scope_slots[] = {
    {Py_tp_doc, "Entering and leaving a scope (compiled; see _scope.PyScopeCore)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, scope_init},
    {Py_tp_dealloc, scope_dealloc},
    {Py_tp_traverse, scope_traverse},
    {Py_tp_clear, scope_clear},
    {Py_tp_methods, scope_methods},
    {Py_tp_members, scope_members},
    {Py_tp_getset, scope_getset},
    {0, NULL},
};

static PyType_Spec scope_spec = {
    .name = "otel_ctxbridge._speedups.ScopeCore",
    .basicsize = sizeof(ScopeCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = scope_slots,
};


/* FieldGetter: what bridge.get is when this module is built. It answers from the bridge's
 * read cache (ContextBridge._last: the context read twice in a row and every field's value
 * in it, MISSING when unset) and leaves every other case to the Python method. */
typedef struct {
    PyObject_HEAD
    PyObject *bridge;
    PyObject *attributes; /* the bridge's __dict__, where _last is kept */
    PyObject *missing;    /* _state.MISSING */
    PyObject *fallback;   /* the bridge's Python get, bound */
    Stand stand;          /* ContextBridge.get */
    vectorcallfunc vectorcall;
} FieldGetter;

static PyObject *str_last;  /* "_last" */

static PyObject *
getter_vectorcall(FieldGetter *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    int holds = self->bridge == NULL ? -1 : stand_holds(&self->stand, self->bridge);
    if (holds <= 0) {
        return holds < 0 ? NULL : call_replacement(&self->stand, self->bridge, args, nargsf, kwnames);
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames == NULL && (nargs == 1 || nargs == 2) && PyUnicode_CheckExact(args[0]) &&
        configured && self->attributes != NULL) {
        /* An exact str name: the lookups below run no Python code. */
        PyObject *last = PyDict_GetItemWithError(self->attributes, str_last);
        if (last == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (last != NULL && PyTuple_CheckExact(last) && PyTuple_GET_SIZE(last) == 3 &&
            PyDict_CheckExact(PyTuple_GET_ITEM(last, 1))) {
            PyObject *ctx = NULL;
            if (PyContextVar_Get(config.var, NULL, &ctx) < 0) {
                return NULL;
            }
            int cached = ctx != NULL && ctx == PyTuple_GET_ITEM(last, 0);
            Py_XDECREF(ctx); /* the cache holds the context: its identity stays valid */
            if (cached) {
                PyObject *value = PyDict_GetItemWithError(PyTuple_GET_ITEM(last, 1), args[0]);
                if (value == NULL && PyErr_Occurred()) {
                    return NULL;
                }
                if (value != NULL) {
                    if (value == self->missing) {
                        value = nargs == 2 ? args[1] : Py_None;
                    }
                    Py_INCREF(value);
                    return value;
                }
            }
        }
    }
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this bridge is being destroyed");
        return NULL;
    }
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *
getter_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *bridge, *attributes, *missing, *fallback, *original = NULL;
    static char *names[] = {"bridge", "attributes", "missing", "fallback", "original", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!OO|O:FieldGetter", names, &bridge,
                                     &PyDict_Type, &attributes, &missing, &fallback,
                                     &original)) {
        return NULL;
    }
    FieldGetter *self = PyObject_GC_New(FieldGetter, type);
    if (self == NULL) {
        return NULL;
    }
    if (original == Py_None) {
        original = NULL;
    }
    Py_INCREF(bridge);
    Py_INCREF(attributes);
    Py_INCREF(missing);
    Py_INCREF(fallback);
    Py_XINCREF(original);
    self->bridge = bridge;
    self->attributes = attributes;
    self->missing = missing;
    self->fallback = fallback;
    self->stand.name = str_get;
    self->stand.original = original;
    self->stand.version = 0;
    self->vectorcall = (vectorcallfunc)getter_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
getter_traverse(FieldGetter *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->bridge);
    Py_VISIT(self->attributes);
    Py_VISIT(self->missing);
    Py_VISIT(self->fallback);
    Py_VISIT(self->stand.original);
    return 0;
}

static int
getter_clear(FieldGetter *self)
{
    Py_CLEAR(self->bridge);
    Py_CLEAR(self->attributes);
    Py_CLEAR(self->missing);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->stand.original);
    return 0;
}

static void
getter_dealloc(FieldGetter *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    getter_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMemberDef getter_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(FieldGetter, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot getter_slots[] = {
    {Py_tp_doc, "get(name, default=None): the value of field name in the current context, "
                "or default when unset; see ContextBridge.get."},
    {Py_tp_new, getter_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_dealloc, getter_dealloc},
    {Py_tp_traverse, getter_traverse},
    {Py_tp_clear, getter_clear},
    {Py_tp_members, getter_members},
    {Py_tp_getset, getter_getset},
    {0, NULL},
};

static PyType_Spec getter_spec = {
    .name = "otel_ctxbridge._speedups.FieldGetter",
    .basicsize = sizeof(FieldGetter),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = getter_slots,
};

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
    PyObject *new = fast_derive(args[0], args[1], args[2], args[3], frame);
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

/* ---- Writing checked attributes onto an SDK span (_span_write's direct path) ---------- */

/* An attribute of `obj`, or NULL: with an exception set, or without one (cleared) when it
 * is an AttributeError, which means "not the SDK this code knows". */
static PyObject *
sdk_attribute(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
    }
    return value;
}

/* Call `method` ("acquire" or "release") of `lock`: 0 or -1 (error set). */
static int
call_lock(PyObject *lock, PyObject *method)
{
    PyObject *result = PyObject_CallMethodNoArgs(lock, method);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* Add the items of `attributes` that `items` does not have: 0, or -1 (error set). */
static int
keep_existing_update(PyObject *items, PyObject *attributes)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(attributes, &pos, &key, &value)) {
        if (PyDict_SetDefault(items, key, value) == NULL) {
            return -1;
        }
    }
    return 0;
}

/* Under the span's lock (held, or free as locks_free() found it): write `attributes` into
 * `items` (the store's dict; under `store_lock` when it is given, as the SDK's own writes and
 * BoundedAttributes' readers take it; with `overwrite` 0, only those it does not have yet),
 * and when `expected` is not None and the span still has that name, `renamed` too, and
 * rename the span to `name`. `maxlen`: the store's count limit,
 * or -1. 1: done or nothing to do (ended); 0: not the SDK this code knows, or a limit that now
 * applies (nothing written); -1: an error (set). */
static int
write_span_locked(PyObject *span, PyObject *store_lock, PyObject *items, Py_ssize_t maxlen,
                  PyObject *attributes, int overwrite, PyObject *expected, PyObject *name,
                  PyObject *renamed)
{
    PyObject *end = sdk_attribute(span, str_end_time);
    if (end == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int ended = end != Py_None;
    Py_DECREF(end);
    if (ended) {
        return 1; /* an ended span stays as its exporter saw it */
    }
    if (expected != Py_None) {
        PyObject *current = sdk_attribute(span, str_name);
        if (current == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        int same = PyObject_RichCompareBool(current, expected, Py_EQ);
        Py_DECREF(current);
        if (same < 0) {
            return -1;
        }
        if (!same) {
            expected = Py_None; /* renamed since (by the application or a hook): kept */
        }
    }
    int rename = expected != Py_None;
    if (!rename && PyDict_GET_SIZE(attributes) == 0) {
        return 1;
    }
    if (store_lock != NULL && call_lock(store_lock, str_acquire) < 0) {
        return -1;
    }
    int done = 1;
    if (maxlen >= 0 && PyDict_GET_SIZE(items) + PyDict_GET_SIZE(attributes) +
                               (rename ? PyDict_GET_SIZE(renamed) : 0) > maxlen) {
        done = 0; /* grown since the check before the lock: the SDK's path counts drops */
    }
    else if (overwrite ? PyDict_Update(items, attributes) < 0
                       : keep_existing_update(items, attributes) < 0) {
        done = -1;
    }
    else if (rename && PyDict_Update(items, renamed) < 0) {
        done = -1;
    }
    if (store_lock != NULL) {
        PyObject *exc_type, *exc_value, *exc_tb;
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
        if (call_lock(store_lock, str_release) < 0) {
            Py_XDECREF(exc_type);
            Py_XDECREF(exc_value);
            Py_XDECREF(exc_tb);
            return -1;
        }
        PyErr_Restore(exc_type, exc_value, exc_tb);
    }
    if (done == 1 && rename && PyObject_SetAttr(span, str_name, name) < 0) {
        return -1;
    }
    return done;
}

/* 1 when `lock` is a threading.Lock nobody holds, 0 when it is held or of another type, -1 on
 * an error (set). */
static int
lock_is_free(PyObject *lock)
{
    if ((PyObject *)Py_TYPE(lock) != config.lock_type) {
        return 0;
    }
    PyObject *held = PyObject_CallMethodNoArgs(lock, str_locked);
    if (held == NULL) {
        return -1;
    }
    int nobody = held == Py_False;
    Py_DECREF(held);
    return nobody;
}

/* 1 when `v` is an attribute value whose release runs no Python code: an exact str, int,
 * float, bool or None, or an exact tuple of those. */
static int
plain_value(PyObject *v)
{
    if (PyUnicode_CheckExact(v) || PyLong_CheckExact(v) || PyFloat_CheckExact(v) ||
        PyBool_Check(v) || v == Py_None) {
        return 1;
    }
    if (!PyTuple_CheckExact(v)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(v); i++) {
        PyObject *item = PyTuple_GET_ITEM(v, i);
        if (!(PyUnicode_CheckExact(item) || PyLong_CheckExact(item) || PyFloat_CheckExact(item) ||
              PyBool_Check(item) || item == Py_None)) {
            return 0;
        }
    }
    return 1;
}

/* 1 when every key of `dict` is an exact str and, with `values`, every value is plain: then
 * looking keys up, inserting and replacing values run no Python code (no __eq__ of a str
 * subclass, no __del__ of a replaced value). */
static int
plain_items(PyObject *dict, int values)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || (values && !plain_value(value))) {
            return 0;
        }
    }
    return 1;
}

/* 1 when the write may skip taking the two locks: the span is the SDK's own class (plain
 * attributes: reading and writing them runs no Python code), its name (when it is to be
 * compared and replaced) and its attributes are plain (see plain_items), and nobody holds
 * its lock or its store's. The GIL is held from here to the end of the write and no Python
 * code runs in between, so no other thread can enter the sections those locks guard (end(),
 * the SDK's writes, BoundedAttributes' deepcopy) until the write is done: taking them would
 * change nothing but the cost (four method calls). Without a GIL (a free-threaded build that
 * runs with it off) the locks are always taken. 0: take the locks; -1: an error (set). */
static int
locks_free(PyObject *span, PyObject *lock, PyObject *store_lock, PyObject *items,
           PyObject *attributes, PyObject *expected, PyObject *renamed)
{
#ifdef Py_GIL_DISABLED
    return 0;
#else
    if ((PyObject *)Py_TYPE(span) != config.span_type || !plain_items(items, 1) ||
        !plain_items(attributes, 0)) {
        return 0;
    }
    if (expected != Py_None) {
        if (!PyUnicode_CheckExact(expected) || !plain_items(renamed, 0)) {
            return 0;
        }
        PyObject *current = sdk_attribute(span, str_name);
        if (current == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        int plain = PyUnicode_CheckExact(current);
        Py_DECREF(current);
        if (!plain) {
            return 0;
        }
    }
    int nobody = lock_is_free(lock);
    if (nobody != 1) {
        return nobody;
    }
    return lock_is_free(store_lock);
#endif
}

/* write_span(span, attributes, overwrite, expected, name, renamed): see
 * _span_write.write_attributes and rename_span. True: written (or nothing to do); False: the caller takes the public path. */
static PyObject *
write_span(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "write_span() takes 6 arguments");
        return NULL;
    }
    PyObject *span = args[0], *attributes = args[1], *expected = args[3], *name = args[4];
    PyObject *renamed = args[5];
    int overwrite = PyObject_IsTrue(args[2]);
    if (overwrite < 0) {
        return NULL;
    }
    PyObject *store = NULL, *probe = NULL, *items = NULL, *lock = NULL, *store_lock = NULL;
    int done = 0;
    if (!configured || !PyDict_CheckExact(attributes) ||
        (expected != Py_None && (!PyUnicode_Check(name) || !PyDict_CheckExact(renamed)))) {
        Py_RETURN_FALSE;
    }
    Py_ssize_t adding = PyDict_GET_SIZE(attributes) +
                        (expected != Py_None ? PyDict_GET_SIZE(renamed) : 0);
    if ((store = sdk_attribute(span, str_span_attributes)) == NULL) {
        goto out;
    }
    if ((PyObject *)Py_TYPE(store) != config.bounded_type) {
        goto out;
    }
    if ((probe = sdk_attribute(store, str_max_value_len)) == NULL || probe != Py_None) {
        goto out; /* a length limit: the SDK truncates */
    }
    Py_CLEAR(probe);
    if ((items = sdk_attribute(store, str_dict)) == NULL || !PyDict_CheckExact(items)) {
        goto out;
    }
    if ((probe = sdk_attribute(store, str_maxlen)) == NULL) {
        goto out;
    }
    Py_ssize_t maxlen = -1;
    if (probe != Py_None) {
        maxlen = PyLong_Check(probe) ? PyLong_AsSsize_t(probe) : -1;
        if (maxlen < 0) {
            PyErr_Clear();
            goto out;
        }
        if (PyDict_GET_SIZE(items) + adding > maxlen) {
            goto out; /* the SDK would drop some: its own path counts them */
        }
    }
    if ((lock = sdk_attribute(span, str_lock)) == NULL ||
        (store_lock = sdk_attribute(store, str_lock)) == NULL) {
        goto out;
    }
    int unlocked = locks_free(span, lock, store_lock, items, attributes, expected, renamed);
    if (unlocked != 0) {
        done = unlocked < 0 ? -1 : write_span_locked(span, NULL, items, maxlen, attributes,
                                                     overwrite, expected, name, renamed);
        goto out;
    }
    if (call_lock(lock, str_acquire) < 0) {
        done = -1;
        goto out;
    }
    done = write_span_locked(span, store_lock, items, maxlen, attributes, overwrite, expected,
                             name, renamed);
    PyObject *exc_type, *exc_value, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb); /* release the lock whatever happened */
    if (call_lock(lock, str_release) < 0) {
        Py_XDECREF(exc_type);
        Py_XDECREF(exc_value);
        Py_XDECREF(exc_tb);
        done = -1;
    }
    else {
        PyErr_Restore(exc_type, exc_value, exc_tb);
    }
out:
    Py_XDECREF(store);
    Py_XDECREF(probe);
    Py_XDECREF(items);
    Py_XDECREF(lock);
    Py_XDECREF(store_lock);
    if (done < 0 || (done == 0 && PyErr_Occurred())) {
        return NULL;
    }
    return PyBool_FromLong(done);
}

#include "_speedups_headers.h"

static PyMethodDef module_methods[] = {
    {"collect_headers", (PyCFunction)(void (*)(void))collect_headers, METH_FASTCALL,
     "collect_headers(headers, wanted): {name: [values]} of the wanted headers, None when "
     "none is there, NotImplemented for a shape the Python code handles."},
    {"trace_headers", (PyCFunction)(void (*)(void))trace_headers, METH_FASTCALL,
     "trace_headers(headers, others): (traceparent values, tracestate values) when no header "
     "is named in others or has a backslash; None when one does, or for another shape."},
    {"append_header", (PyCFunction)(void (*)(void))append_header, METH_FASTCALL,
     "append_header(message, name, value): add the header unless it is there (True), None "
     "for a shape the Python code handles."},
    {"write_span", (PyCFunction)(void (*)(void))write_span, METH_FASTCALL,
     "write_span(span, attributes, overwrite, expected, name, renamed): the direct path of _span_write (True), or "
     "False when the caller must take the public one."},
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
        str_local = PyUnicode_InternFromString("local");
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
        if (!str_key || !str_plans || !str_frame || !str_local || !str_updates || !str_last ||
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
