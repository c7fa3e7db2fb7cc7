/* ScopeState: what a `with bridge.scope(...)` block holds while it runs.
 * Included once by _speedups.c (one translation unit), after _speedups_state.h.
 *
 * A `with` statement looks `__exit__` up before calling `__enter__` and keeps what it got
 * until the block ends. ScopeCore.__exit__ (_speedups_scope.h) then gives a blank
 * ScopeState, which entering fills in: it is the baggage dict of the scope's context, the
 * scope's State (under the bridge's key; a dict subclass with State's fields) and the
 * record of the way back (the context from before and the contextvars.Context it was
 * entered in). One object where a token-based scope needs four (the scope, its bound
 * __exit__, the ContextVar token and the State). While the block runs, contexts captured in
 * it (a task started in it) keep the way back alive with the scope's context; leaving clears
 * it, so a context that outlives the block keeps no earlier context alive. To OpenTelemetry
 * it is a dict; copied or pickled, a plain one. */

static PyObject *scope_state_vectorcall(ScopeState *, PyObject *const *, size_t, PyObject *);

/* A blank ScopeState: no baggage, the fields of a State holding nothing. New reference. */
static PyObject *
new_scope_state(void)
{
    /* dict's __new__: an empty dict, fields NULL, tracked by the collector */
    ScopeState *state = (ScopeState *)PyDict_Type.tp_new(scope_state_type, empty_tuple, NULL);
    if (state == NULL) {
        return NULL;
    }
    set_fields(&state->f, config.empty, Py_None, zero);
    state->vectorcall = (vectorcallfunc)scope_state_vectorcall;
    return (PyObject *)state;
}

/* Leave the block: make the context from before it current again, in the contextvars.Context
 * it was entered in; elsewhere (another task or thread) the failure is counted and logged,
 * as for a ContextVar token of another context. Once; then a no-op. */
static PyObject *
scope_state_leave(ScopeState *self)
{
    PyObject *prev = self->prev, *entered_in = self->entered_in;
    if (prev == NULL) {
        Py_RETURN_NONE;
    }
    self->prev = NULL;
    self->entered_in = NULL;
    PyObject *result;
    if (PyThreadState_Get()->context != entered_in) {
        result = PyObject_CallNoArgs(config.detach_failed);
    }
    else {
        PyObject *token = PyContextVar_Set(config.var, prev);
        result = token == NULL ? NULL : Py_NewRef(Py_None);
        Py_XDECREF(token);
    }
    Py_DECREF(prev);
    Py_XDECREF(entered_in);
    return result;
}

/* state(exc_type, exc, tb): what the `with` block calls on leaving. */
static PyObject *
scope_state_vectorcall(ScopeState *self, PyObject *const *Py_UNUSED(args), size_t nargsf,
                       PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 3 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "__exit__() takes 3 positional arguments");
        return NULL;
    }
    return scope_state_leave(self);
}

static int
scope_state_traverse(ScopeState *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->prev);
    Py_VISIT(self->entered_in);
    int visited = visit_fields(&self->f, visit, arg);
    return visited != 0 ? visited : PyDict_Type.tp_traverse((PyObject *)self, visit, arg);
}

static int
scope_state_clear(ScopeState *self)
{
    clear_fields(&self->f);
    Py_CLEAR(self->prev);
    Py_CLEAR(self->entered_in);
    return PyDict_Type.tp_clear((PyObject *)self);
}

static void
scope_state_dealloc(ScopeState *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    clear_fields(&self->f);
    Py_CLEAR(self->prev);
    Py_CLEAR(self->entered_in);
    PyDict_Type.tp_dealloc((PyObject *)self); /* frees the object */
    Py_DECREF(type);
}

/* Copied or pickled, it is the plain dict of its baggage. */
static PyObject *
scope_state_reduce(ScopeState *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *bag = PyDict_Copy((PyObject *)self);
    if (bag == NULL) {
        return NULL;
    }
    return Py_BuildValue("(O(N))", (PyObject *)&PyDict_Type, bag);
}

static PyMethodDef scope_state_methods[] = {
    {"__reduce__", (PyCFunction)scope_state_reduce, METH_NOARGS,
     "Copied or pickled, a ScopeState is the plain dict of its baggage."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef scope_state_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(ScopeState, vectorcall), READONLY, NULL},
    {"local", T_OBJECT_EX, offsetof(ScopeState, f.local), READONLY, "The process-local values."},
    {"generation", T_OBJECT_EX, offsetof(ScopeState, f.generation), READONLY,
     "When it was written."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot scope_state_slots[] = {
    {Py_tp_doc, "The baggage of a scope entered by a with block, which is also its State and "
                "what the block calls on leaving (see _speedups_scope_state.h)."},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, scope_state_traverse},
    {Py_tp_clear, scope_state_clear},
    {Py_tp_dealloc, scope_state_dealloc},
    {Py_tp_methods, scope_state_methods},
    {Py_tp_members, scope_state_members},
    {Py_tp_getset, state_getset}, /* frame, shared with State */
    {0, NULL},
};

static PyType_Spec scope_state_spec = {
    .name = "otel_ctxbridge._speedups.ScopeState",
    .basicsize = sizeof(ScopeState),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = scope_state_slots,
};
