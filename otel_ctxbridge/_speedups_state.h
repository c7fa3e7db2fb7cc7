/* State (the compiled _state.PyState) and the helpers that make one for a derived context.
 * Included once by _speedups.c (one translation unit), after the declarations it uses. */

/* What _state.PyState holds: the process-local values of a context, its frame and when it
 * was written. */
typedef struct {
    PyObject *local;
    PyObject *frame;
    PyObject *generation;
} StateFields;

/* State: _state.PyState as a compiled type that C code creates without a Python call. */
typedef struct {
    PyObject_HEAD
    StateFields f;
} State;

/* ScopeState (_speedups_scope_state.h): the baggage dict of a scope entered by a `with`
 * block, which is also the scope's State and what the block calls on leaving. */
typedef struct {
    PyDictObject bag;
    StateFields f;
    PyObject *prev;       /* while the block runs: the context to go back to, else NULL */
    PyObject *entered_in; /* the contextvars.Context the block entered it in */
    vectorcallfunc vectorcall; /* leaving, called without building an argument tuple */
} ScopeState;

static PyTypeObject *scope_state_type; /* ScopeState */

/* The fields of a compiled State or ScopeState (borrowed), else NULL. */
static inline StateFields *
fields_of(PyObject *state)
{
    if (Py_TYPE(state) == state_type) {
        return &((State *)state)->f;
    }
    if (Py_TYPE(state) == scope_state_type) {
        return &((ScopeState *)state)->f;
    }
    return NULL;
}

/* Set `fields` (of a State or ScopeState). */
static void
set_fields(StateFields *fields, PyObject *local, PyObject *frame, PyObject *generation)
{
    Py_INCREF(local);
    Py_INCREF(frame);
    Py_INCREF(generation);
    Py_XSETREF(fields->local, local);
    Py_XSETREF(fields->frame, frame);
    Py_XSETREF(fields->generation, generation);
}

/* tp_traverse and tp_clear of `fields` (of a State or ScopeState). */
static int
visit_fields(StateFields *fields, visitproc visit, void *arg)
{
    Py_VISIT(fields->local);
    Py_VISIT(fields->frame);
    Py_VISIT(fields->generation);
    return 0;
}

static void
clear_fields(StateFields *fields)
{
    Py_CLEAR(fields->local);
    Py_CLEAR(fields->frame);
    Py_CLEAR(fields->generation);
}

static PyObject *
new_state(PyObject *local, PyObject *frame, PyObject *generation)
{
    State *state = PyObject_GC_New(State, state_type);
    if (state == NULL) {
        return NULL;
    }
    state->f.local = state->f.frame = state->f.generation = NULL;
    set_fields(&state->f, local, frame, generation);
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
    return visit_fields(&self->f, visit, arg);
}

static int
state_clear(State *self)
{
    clear_fields(&self->f);
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
    {"local", T_OBJECT_EX, offsetof(State, f.local), READONLY, "The process-local values."},
    {"generation", T_OBJECT_EX, offsetof(State, f.generation), READONLY, "When it was written."},
    {NULL, 0, 0, 0, NULL},
};

/* The frame of a State or ScopeState (both types use state_getset). */
static PyObject *
state_get_frame(PyObject *self, void *Py_UNUSED(closure))
{
    StateFields *fields = fields_of(self);
    if (fields->frame == NULL) {
        PyErr_SetString(PyExc_AttributeError, "frame");
        return NULL;
    }
    return Py_NewRef(fields->frame);
}

static int
state_set_frame(PyObject *self, PyObject *frame, void *Py_UNUSED(closure))
{
    if (frame == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a State's frame cannot be deleted");
        return -1;
    }
    StateFields *fields = fields_of(self);
    Py_INCREF(frame);
    Py_XSETREF(fields->frame, frame);
    return 0;
}

static PyGetSetDef state_getset[] = {
    {"frame", state_get_frame, state_set_frame,
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

/* `into` given these fields, or a new State when `into` is NULL. New reference or NULL. */
static PyObject *
fill_state(ScopeState *into, PyObject *local, PyObject *frame, PyObject *generation)
{
    if (into == NULL) {
        return new_state(local, frame, generation);
    }
    set_fields(&into->f, local, frame, generation);
    Py_INCREF(into);
    return (PyObject *)into;
}

/* The State of a context written on top of one holding `state` (a compiled State or
 * ScopeState, borrowed, may be NULL; `parent_frame` is its frame) with no new process-local values, as _derive.derive_context
 * makes it; `frame` is the request frame to start (NULL: none). It is `into` when given (the
 * ScopeState of a `with` block). New reference or NULL. */
static PyObject *
derived_state(PyObject *state, PyObject *parent_frame, PyObject *frame, ScopeState *into)
{
    StateFields *parent = state != NULL ? fields_of(state) : NULL;
    if (frame == NULL) {
        if (state == NULL) {
            return fill_state(into, config.empty, Py_None, zero);
        }
        if (parent_frame == Py_None) {
            return fill_state(into, parent->local, Py_None, zero);
        }
    }
    else if (frame != parent_frame) {
        /* A request frame to start: fresh (no updates recorded yet), its state has generation
         * 0, as child_state() says. */
        PyObject *updates = PyObject_GetAttr(frame, str_updates);
        if (updates == NULL) {
            return NULL;
        }
        int fresh = updates == config.empty;
        Py_DECREF(updates);
        if (fresh) {
            return fill_state(into, parent != NULL ? parent->local : config.empty, frame, zero);
        }
    }
    PyObject *args[3] = {state != NULL ? state : Py_None, Py_None, frame != NULL ? frame : Py_None};
    PyObject *made = PyObject_Vectorcall(config.child_state, args, 3, NULL);
    StateFields *child = made != NULL && into != NULL ? fields_of(made) : NULL;
    if (child == NULL) {
        return made;
    }
    PyObject *filled = fill_state(into, child->local, child->frame, child->generation);
    Py_DECREF(made);
    return filled;
}
