"""Problems, answers, generation backends, the debate engine, the trajectory store and dataset builders."""
